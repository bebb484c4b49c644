"""Sphinx configuration of the crmvae_fast docs: Markdown pages (myst-parser), an API reference from the
docstrings (autodoc + napoleon), and a check that fails the build when a public function, class or method has no
docstring (``_ext/public_docstrings.py``). Build strictly, as ``tests/test_docs.py`` does::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's crmvae_fast, installed or not
sys.path.insert(0, str(HERE / "_ext"))

import crmvae_fast  # noqa: E402

project = "crmvae_fast"
release = version = crmvae_fast.__version__
author = "crmvae_fast contributors"
copyright = "crmvae_fast contributors"  # noqa: A001

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "public_docstrings"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Checked by the public_docstrings extension: every public name of these modules has a docstring.
public_docstrings_modules = [
    "crmvae_fast",              # its __all__: CRMVAE, CRMVAEConfig (and their methods), backend_info, evaluate_*, ...
    "crmvae_fast.ops",          # the fused ops
    "crmvae_fast.reference",    # their eager twins
    "crmvae_fast.evaluation",
    "crmvae_fast.distributed",
    "crmvae_fast.registry",
    "crmvae_fast.counts",
    "crmvae_fast.persistence",
    "crmvae_fast.doctor",
    "crmvae_fast.versions",
    "crmvae_fast.inputs",
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Nitpicky (-n) fails on references to our own names that do not resolve. Types of other libraries (torch,
# typing, MultiVae, the standard library) cannot resolve offline (no intersphinx downloads): they are not ours
# to check.
nitpick_ignore_regex = [
    ("py:(class|obj)", r"(torch|typing|collections|numpy|multivae|pythae|argparse|contextlib|dataclasses)(\..*)?"),
    ("py:class", r"(Tensor|Module|nn\.Module|Optional|Union|Any|Callable|Iterable|Iterator|Sequence|Dict|List|Tuple)"),
    ("py:class", r"(int|float|str|bool|dict|list|tuple|None|NoneType|object|type|range|slice)"),
    ("py:class", r"(device|dtype|Generator|Counter)"),
]

html_theme = "alabaster"
html_title = f"crmvae_fast {release}"
html_static_path = []


def _canonical(path: str):
    """``module.qualname`` of the object a dotted path names (``crmvae_fast.`` prepended if needed), or None."""
    import importlib

    for full in (path, "crmvae_fast." + path):
        parts = full.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            if getattr(obj, "__qualname__", None) and getattr(obj, "__module__", None):
                return f"{obj.__module__}.{obj.__qualname__}"
            return getattr(obj, "__name__", full) if i == len(parts) else full
    return None


def _resolve(app, env, node, contnode):
    """Resolve a Python reference to our code written the way the docstrings write it: relative to the package
    (``:func:`reference.latent_step``` in ``crmvae_fast.ops``) or through a re-export (``crmvae_fast.bench.time_fn``
    for ``crmvae_fast.bench.timing.time_fn``). It resolves to the documented object whose full name ends with the
    target, or that is the same Python object; a target matching none (a typo, an undocumented name) stays
    broken and fails the nitpicky build."""
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    objects = env.get_domain("py").objects
    target = node["reftarget"]
    matches = [name for name in objects if name.endswith("." + target)]
    if len(matches) != 1:
        canon = _canonical(target)
        matches = [name for name in objects if canon and (name == canon or _canonical(name) == canon)][:1]
    if not matches:
        return None
    obj = objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, matches[0])


_HIDDEN = {}


def _hide_from_napoleon(app, what, name, obj, options, lines):
    """Napoleon reads the first line of a data, attribute or property docstring as ``type: text``; ours are
    prose ("CPU limits (2-core machines): ..."), so napoleon does not see them (restored right after it)."""
    if what in ("data", "attribute", "property"):
        _HIDDEN[name] = lines[:]
        lines[:] = []


def _restore_after_napoleon(app, what, name, obj, options, lines):
    if name in _HIDDEN:
        lines[:] = _HIDDEN.pop(name)


def setup(app):
    """The resolver and the napoleon guard (the docstring check is the ``public_docstrings`` extension)."""
    app.connect("missing-reference", _resolve)
    app.connect("autodoc-process-docstring", _hide_from_napoleon, priority=499)
    app.connect("autodoc-process-docstring", _restore_after_napoleon, priority=501)
