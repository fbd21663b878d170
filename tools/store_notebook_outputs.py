"""Execute notebooks and store their outputs in the files: what the docs site and a code host show.

    python tools/store_notebook_outputs.py                      # every notebooks/*.ipynb (make notebook-outputs)
    python tools/store_notebook_outputs.py notebooks/05_x.ipynb # one notebook
    python tools/store_notebook_outputs.py --check              # are the stored outputs those of the sources?

Each notebook is run top to bottom in a fresh kernel, in its own directory (as nbmake runs it), and written
back with its outputs and, in its metadata, a digest of its code cells. ``--check`` (run by
``tests/test_notebooks.py``) fails for a notebook whose code changed since its outputs were stored, that was
not run top to bottom in one kernel, or whose stored outputs contain an error. ``make test`` executes every
notebook once more with nbmake, which checks that it still runs against the library as it is now.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import pathlib
import sys
import time

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KEY = "optax_second_order"


def code_digest(nb) -> str:
    """SHA-256 of the notebook's code cells, in order (markdown edits do not make outputs stale)."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def problems(path: pathlib.Path) -> list[str]:
    """Why the stored outputs of ``path`` are not a fresh top-to-bottom run of its code (empty: they are)."""
    nb = nbformat.read(path, as_version=4)
    found = []
    if nb.metadata.get(KEY, {}).get("code_sha256") != code_digest(nb):
        found.append("its code changed since its outputs were stored (or they never were)")
    code = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    if [cell.execution_count for cell in code] != list(range(1, len(code) + 1)):
        found.append("its cells were not run once each, top to bottom, in one kernel")
    if any(output.output_type == "error" for cell in code for output in cell.outputs):
        found.append("a stored output is an error")
    return found


def execute(path: pathlib.Path, timeout: int) -> float:
    """Run ``path`` in a fresh kernel, store its outputs and the digest of its code; returns the seconds."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata[KEY] = {"code_sha256": code_digest(nb)}
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=pathlib.Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="only check the stored outputs")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="notebooks run at once (default 2)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.paths] or sorted(NOTEBOOKS.glob("*.ipynb"))

    if args.check:
        stale = {path: problems(path) for path in paths}
        for path, found in stale.items():
            for problem in found:
                print(f"{path.relative_to(ROOT)}: {problem}; run `make notebook-outputs` (or {pathlib.Path(__file__).relative_to(ROOT)} {path.relative_to(ROOT)})")
        return int(any(stale.values()))

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for path, seconds in zip(paths, pool.map(lambda p: execute(p, args.timeout), paths)):
            print(f"{path.relative_to(ROOT)}: outputs stored ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
