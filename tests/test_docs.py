"""The documentation lists every public name, and its pages and tutorials are where the index says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cellsymphony as cs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _api_names() -> set[str]:
    text = (DOCS / "api.md").read_text()
    return set(re.findall(r"^\s+((?:io|pp|tl|pl|datasets|models)\.\w+)\s*$", text, flags=re.M))


@pytest.mark.parametrize("sub", ["io", "pp", "tl", "pl", "datasets", "models"])
def test_api_page_lists_every_public_name(sub):
    listed = {n.split(".", 1)[1] for n in _api_names() if n.startswith(f"{sub}.")}
    public = set(getattr(cs, sub).__all__)
    assert public - listed == set(), f"add to docs/api.md: {sorted(public - listed)}"
    assert listed - public == set(), f"docs/api.md lists names that are not public: {sorted(listed - public)}"


def test_index_pages_exist():
    text = (DOCS / "index.md").read_text()
    block = re.findall(r"```\{toctree\}(.*?)```", text, flags=re.S)
    entries = [line.strip() for b in block for line in b.splitlines() if line.strip() and not line.strip().startswith(":")]
    for entry in entries:
        if entry == "<!-- guide-pages -->":  # filled in by conf.py from GUIDE_PAGES
            continue
        assert (DOCS / f"{entry}.md").exists(), f"index.md lists {entry!r}, which has no page"


def test_tutorials_are_myst_notebooks():
    for name in ("end_to_end", "own_labels", "he_only", "he_slides"):
        text = (ROOT / "tutorials" / f"{name}.md").read_text()
        assert text.startswith("---\nfile_format: mystnb"), name
        assert "{code-cell} ipython3" in text, name
