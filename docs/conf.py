"""Sphinx configuration for the cellsymphony documentation.

Builds offline: no intersphinx inventories are fetched. The tutorials (``../tutorials/*.md``, MyST
notebooks) are executed during the build and cached in ``docs/_build/.jupyter_cache``.
"""

from __future__ import annotations

import os
from importlib.metadata import version as _version
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

HERE = Path(__file__).resolve().parent

project = "cellsymphony"
author = "cellsymphony developers"
copyright = "2026, cellsymphony developers"
release = _version("cellsymphony")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" as fields, not directives that duplicate the documented properties
typehints_defaults = "comma"
typehints_use_signature = False
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# notebooks: the tutorials run during the build (small data, tiny models, a few minutes on a CPU)
nb_execution_mode = os.environ.get("CELLSYMPHONY_NB_EXECUTION", "cache")
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# .rst first: autosummary writes its generated pages with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
html_theme = "pydata_sphinx_theme"
html_title = "cellsymphony"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type"]

os.environ.setdefault("CELLSYMPHONY_CACHE", str(HERE / "_build" / "cellsymphony_cache"))


def _skip_torch_module_members(app, what, name, obj, skip, options):
    """Leave out what the ``nn.Module`` classes of the API (``CellClassifierModule``, ``ContrastiveModule``) inherit
    from torch unchanged (``add_module``, ``named_parameters``, hooks, ...): torch documents those, and their
    docstrings are not numpydoc (their tables made docutils report indentation errors). Members these classes
    define or override (``forward``, ``set_standardization``, ...) are documented as usual."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None
    base = torch.nn.Module
    if name in vars(base) and vars(base)[name] is obj:  # the very object nn.Module defines: not overridden
        return True
    if name in getattr(base, "__annotations__", {}) and not callable(obj):  # e.g. ``training``
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_torch_module_members)
