"""Sphinx configuration for the cellsymphony documentation."""

from __future__ import annotations

from importlib.metadata import version as _version

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
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "comma"
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "cache"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "generated/*.md"]
html_theme = "pydata_sphinx_theme"
html_title = "cellsymphony"
html_static_path = ["_static"]
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
}
intersphinx_disabled_reftypes = ["*"]
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type", "intersphinx.external"]
