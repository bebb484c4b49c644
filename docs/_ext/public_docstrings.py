"""A Sphinx extension that fails the build when a public function, class or method has no docstring.

``public_docstrings_modules`` (set in ``conf.py``) lists the modules whose public surface is checked. For each
module: the names in its ``__all__`` when it has one, else every function and class it defines whose name does
not start with ``_``. Submodules listed in ``__all__`` are skipped (list them on their own). For each class: its
own docstring and those of the public methods, properties, classmethods and staticmethods it defines itself
(not those it inherits, e.g. from ``torch.nn.Module``). The check runs when the builder starts
(``builder-inited``) and raises an error naming every undocumented object, whatever the warning flags.
"""

from __future__ import annotations

import importlib
import inspect

from sphinx.errors import ExtensionError


def _documented(obj) -> bool:
    """Its own docstring: not one inherited from a base class's method (``inspect.getdoc`` would take that), not
    the signature a dataclass writes when it has none."""
    doc = obj.__doc__
    if inspect.isclass(obj) and doc and doc.startswith(obj.__name__ + "("):
        return False  # a dataclass without a docstring
    return bool(doc and doc.strip())


def _class_members(cls):
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if isinstance(member, property) or inspect.isfunction(member):
            yield name, member


def missing_docstrings(module_names) -> list:
    """The qualified names of the public functions, classes and methods of ``module_names`` without a
    docstring (see the module's docstring for what is public)."""
    missing = []
    for modname in module_names:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None)
        if names is None:
            names = [n for n, o in vars(mod).items() if not n.startswith("_")
                     and (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == modname]
        for name in names:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            if not _documented(obj):
                missing.append(f"{modname}.{name}")
            if inspect.isclass(obj):
                missing += [f"{modname}.{name}.{m}" for m, member in _class_members(obj) if not _documented(member)]
    return missing


def _check(app) -> None:
    missing = missing_docstrings(app.config.public_docstrings_modules)
    if missing:
        raise ExtensionError(f"{len(missing)} public name(s) have no docstring; expected every public function, "
                             f"class and method to say what it does; add docstrings to: {', '.join(missing)}")


def setup(app):
    """Register the ``public_docstrings_modules`` setting and the check."""
    app.add_config_value("public_docstrings_modules", [], "env")
    app.connect("builder-inited", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
