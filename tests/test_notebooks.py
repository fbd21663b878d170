"""Every notebook keeps the outputs of a top-to-bottom run of its current code: the docs site and a code host show
them (``make notebook-outputs`` stores them; ``make notebooks`` executes every notebook again in ``make test``)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

_spec = importlib.util.spec_from_file_location("store_notebook_outputs", ROOT / "tools" / "store_notebook_outputs.py")
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_outputs_are_those_of_the_code(path):
    found = store.problems(path)
    assert not found, f"{path.name}: {'; '.join(found)}. Run `make notebook-outputs` and commit the notebook."


def test_a_notebook_whose_code_changed_is_stale(tmp_path):
    import nbformat

    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    next(cell for cell in nb.cells if cell.cell_type == "code").source += "\n"
    nbformat.write(nb, tmp_path / "edited.ipynb")
    assert any("code changed" in problem for problem in store.problems(tmp_path / "edited.ipynb"))


def test_the_docs_show_every_notebook():
    link = ROOT / "docs" / "notebooks"
    assert link.is_symlink() and link.resolve() == (ROOT / "notebooks").resolve()
