# Two commands for a fresh machine; both build their own virtual environment from the package index.
#   make demo   -- the main job: the benchmark on its bundled default tasks
#   make test   -- every check: unit tests, docs build, notebooks
# and, for whoever adds or changes a notebook:
#   make notebook-outputs -- run notebooks/*.ipynb and store their outputs in the files (the docs show those)
VENV ?= .venv
PY := $(VENV)/bin/python
# XLA:CPU runs eigh, QR and Cholesky in OpenBLAS, whose threads compete with XLA's own: with one OpenBLAS thread the
# refreshes of Shampoo, SOAP and K-FAC run several times faster and steadier (docs/benchmark.md, "CPU threads").
# The library also limits scipy's OpenBLAS to one thread itself (curvature/threads.py) when this is unset; override
# with `make demo OPENBLAS_NUM_THREADS=...`.
OPENBLAS_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,docs,notebooks,bench]"
	touch $(STAMP)

.PHONY: install test unit docs notebooks notebook-outputs demo primitives
install: $(STAMP)

unit: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# Executes each notebook once, in memory (the files keep their stored outputs; `docs` renders those, so the docs
# build executes nothing). tests/test_notebooks.py checks that the stored outputs are those of the current code.
# The flags of tests/conftest.py (fast XLA:CPU compiles), for the notebooks' kernels: 1 min 54 s -> 1 min 6 s.
notebooks: $(STAMP)
	XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false $(XLA_FLAGS)" \
		$(PY) -m pytest -n 2 -q --nbmake notebooks

notebook-outputs: $(STAMP)
	$(PY) tools/store_notebook_outputs.py

test: unit docs notebooks

demo: $(STAMP)
	$(PY) -m optax_second_order.bench

primitives: $(STAMP)
	$(PY) -m optax_second_order.bench primitives
