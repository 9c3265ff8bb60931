"""Sphinx configuration of the documentation site.

Build (warnings are errors): python -m sphinx -W --keep-going -b html docs docs/_build/html

Two folders of this source directory are generated on every build and git-ignored:
``docs/tutorials/`` (copies of ``tutorials/*.ipynb``, shown with their stored outputs, never
executed) and ``docs/api/`` (one autodoc page per subpackage of ``flowpp_ref``). MathJax is
served from the build's ``_static/mathjax/`` (the sphinx-mathjax-offline package), so the site
renders its math without a network.
"""
import glob
import os
import pkgutil
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)

import flowpp_ref  # noqa: E402

project = "flowpp-ref"
author = "flowpp-ref contributors"
release = version = flowpp_ref.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",   # sets mathjax_path to its local copy and copies it into _static/
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = "flowpp-ref"

# The notebooks are stored executed; their outputs are the content.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autodoc_mock_imports = ["cupy", "mpi4py", "safetensors"]   # optional dependencies, imported lazily anyway
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_numpy_docstring = False


def _write_if_changed(path, text):
    """Write ``text`` to ``path`` unless it already holds it (keeps Sphinx's incremental builds)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _same_file(a, b):
    if not os.path.exists(b) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def copy_tutorials():
    """Mirror ``tutorials/*.ipynb`` into ``docs/tutorials/``, dropping copies whose source is gone."""
    dest = os.path.join(DOCS, "tutorials")
    os.makedirs(dest, exist_ok=True)
    sources = {os.path.basename(p): p for p in glob.glob(os.path.join(ROOT, "tutorials", "*.ipynb"))}
    for name in os.listdir(dest):
        if name not in sources:
            path = os.path.join(dest, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name, src in sources.items():
        if not _same_file(src, os.path.join(dest, name)):
            shutil.copy2(src, os.path.join(dest, name))


def write_api_pages():
    """One page per subpackage of ``flowpp_ref``: the package docstring, then each module's members."""
    dest = os.path.join(DOCS, "api")
    os.makedirs(dest, exist_ok=True)
    subpackages = sorted(m.name for m in pkgutil.iter_modules(flowpp_ref.__path__) if m.ispkg)
    wanted = {"index.md"} | {f"{name}.md" for name in subpackages}
    for name in os.listdir(dest):
        if name not in wanted:
            os.remove(os.path.join(dest, name))
    index = ["# API reference", "", "Generated from the docstrings.", "",
             "```{eval-rst}", ".. automodule:: flowpp_ref", "   :no-members:", "```", "",
             "```{toctree}", ":maxdepth: 1", ""] + subpackages + ["```", ""]
    _write_if_changed(os.path.join(dest, "index.md"), "\n".join(index))
    for name in subpackages:
        pkg = f"flowpp_ref.{name}"
        path = [os.path.join(os.path.dirname(flowpp_ref.__file__), name)]
        modules = sorted(m.name for m in pkgutil.walk_packages(path, pkg + "."))
        lines = [f"# `{pkg}`", "", "```{eval-rst}", f".. automodule:: {pkg}", "   :no-members:", "```", ""]
        for mod in modules:
            lines += [f"## `{mod}`", "", "```{eval-rst}", f".. automodule:: {mod}", "```", ""]
        _write_if_changed(os.path.join(dest, f"{name}.md"), "\n".join(lines))


copy_tutorials()
write_api_pages()
