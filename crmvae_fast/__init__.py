"""crmvae_fast: MultiVae's CRMVAE, number for number, with fused GPU kernels.

Set ``TRITON_INTERPRET=1`` before importing this package to run the Triton kernels on CPU tensors.
"""

from ._backend import backend_info
from .config import CRMVAEConfig
from .evaluation import evaluate_cond_nll, evaluate_joint_nll
from .model import CRMVAE
from .nn import ModelOutput

__version__ = "0.1.0"

__all__ = ["CRMVAE", "CRMVAEConfig", "ModelOutput", "backend_info", "evaluate_cond_nll", "evaluate_joint_nll", "ops",
           "reference", "__version__"]


def __getattr__(name):
    # ``crmvae_fast.ops`` imports triton and defines the kernels: only when first used.
    if name in ("ops", "reference"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
