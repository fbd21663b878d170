"""Checks on the documentation sources: no control characters (a LaTeX macro such as ``\\top`` written in a
non-raw Python string becomes a TAB followed by ``op``) and no argument names that were renamed."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("notebooks/*.ipynb")])
CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")
RENAMED = ("inverse_frequency", "inverse_sharding", "refresh_every", "max_preconditioned_dim", "graft_beta2", "mesh_axes")


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_control_characters_or_renamed_arguments(path):
    text = path.read_text()
    for number, line in enumerate(text.splitlines(), 1):
        match = CONTROL.search(line)
        assert match is None, f"{path.name}:{number}: control character {match.group()!r} in {line!r}"
    for name in RENAMED:
        assert name not in text, f"{path.name}: mentions {name}, which was renamed"


def test_the_check_finds_an_escaped_macro():
    assert CONTROL.search("$Q_A^\top V$")  # "\t" + "op": what "\\top" becomes in a non-raw string
