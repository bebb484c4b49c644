"""crmvae_fast: MultiVae's CRMVAE, number for number, with fused GPU kernels.

Set ``TRITON_INTERPRET=1`` before first using this package to run the Triton kernels on CPU tensors.

The top-level names are imported on first use (a module ``__getattr__``), so ``import crmvae_fast`` and the
command line's ``--help`` and ``--version`` do not load torch or triton.
"""

__version__ = "0.1.0"

#: Each top-level name and the submodule that defines it.
_LAZY = {"CRMVAE": "model", "CRMVAEConfig": "config", "ModelOutput": "nn", "backend_info": "_backend",
         "evaluate_cond_nll": "evaluation", "evaluate_joint_nll": "evaluation"}

__all__ = ["CRMVAE", "CRMVAEConfig", "ModelOutput", "backend_info", "evaluate_cond_nll", "evaluate_joint_nll", "ops",
           "reference", "__version__"]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule: crmvae_fast.ops, .reference, .distributed, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
