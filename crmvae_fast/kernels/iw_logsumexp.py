"""Importance log-weights fused with an online log-sum-exp: the core of ``compute_joint_nll``.

For data point i and importance samples ``z_ik ~ q(z | X_i) = N(mu_J[i], exp(lv_J[i]))``::

    log w_ik = log_px[i, k] + log N(z_ik; 0, I) - log N(z_ik; mu_J[i], exp(lv_J[i]))
    ll_i     = logsumexp_k log w_ik - log K

The K samples arrive in chunks of k (``batch_size_K``); each chunk is folded into a running pair
``(run_max, run_sum)`` = (max of the log-weights so far, sum of exp(log w - run_max)), so nothing K-long is ever
stored, and the answer does not depend on the chunk size::

    run_max, run_sum = iw_lse_init(n, device, dtype)
    for each chunk:                                    # log_px (n, k), z (n, k, D)
        run_max, run_sum = iw_lse_update(log_px, z, mu_J, lv_J, run_max, run_sum)
    ll = iw_lse_finalize(run_max, run_sum, K)          # (n,)

Where it runs: the C++ op ``torch.ops.crmvae_fast.iw_lse_update`` (schema ``csrc/ops.cpp``, CPU kernel
``csrc/iw_logsumexp_cpu.cpp``, CUDA kernel ``csrc/iw_logsumexp_cuda.cu``) when :mod:`crmvae_fast._extension`
has loaded it with a kernel for the tensors' device, else :func:`iw_lse_update_eager`, the eager twin built on
:func:`crmvae_fast.reference.importance_log_weights`. Evaluation only: no autograd formula is registered.

A point whose log-weights are all ``-inf`` ends with ``(run_max, run_sum) = (-inf, 0)`` and ``ll = -inf``,
never NaN; a ``+inf`` log-weight gives ``(run_max, run_sum) = (+inf, number of +inf weights)`` and
``ll = +inf``; a NaN log-weight gives NaN (NaN wins over +inf).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _extension, reference
from ..common import compute_dtype
from ..inputs import as_count

OP_NAME = "crmvae_fast::iw_lse_update"

__all__ = ["iw_lse_init", "iw_lse_update", "iw_lse_finalize", "iw_lse_update_eager"]


def iw_lse_init(n: int, device=None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The empty running pair for ``n`` points: ``run_max`` = -inf and ``run_sum`` = 0, both (n,).

    Their dtype is the arithmetic dtype for inputs of ``dtype``: float64 for float64, else float32.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise TypeError(f"iw_lse_init: expected n as an int >= 0 (the number of points), got {n!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"iw_lse_init: expected dtype as a torch.dtype, got {dtype!r}")
    ct = compute_dtype(dtype)
    try:
        return (
            torch.full((int(n),), -math.inf, device=device, dtype=ct),
            torch.zeros((int(n),), device=device, dtype=ct),
        )
    except (RuntimeError, TypeError, AssertionError) as exc:  # an unknown or unavailable device
        raise ValueError(f"iw_lse_init: cannot make the running pair on device {device!r} ({exc}); pass the device "
                         "of the data, such as 'cpu' or 'cuda:0'") from None


def iw_lse_update(
    log_px: Tensor, z: Tensor, mu_J: Tensor, lv_J: Tensor, run_max: Tensor, run_sum: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold one chunk of k importance samples into the running pair; returns the new ``(run_max, run_sum)``.

    ``log_px`` (n, k): ``sum_m log p(x_m | z_ik)`` over the observed modalities; ``z`` (n, k, D) the samples;
    ``mu_J``, ``lv_J`` (n, D) the joint posterior; ``run_max``, ``run_sum`` (n,) from :func:`iw_lse_init` or
    the previous call. The inputs are cast to ``run_max``'s dtype (float32 or float64), which is also the
    dtype of the result. Functional (the inputs are not modified) and free of host syncs.
    """
    _check_inputs(log_px, z, mu_J, lv_J, run_max, run_sum)
    ct = run_max.dtype
    log_px, z, mu_J, lv_J = log_px.to(ct), z.to(ct), mu_J.to(ct), lv_J.to(ct)
    if _extension.has_kernel(z.device.type):
        return torch.ops.crmvae_fast.iw_lse_update(log_px, z, mu_J, lv_J, run_max, run_sum)
    return iw_lse_update_eager(log_px, z, mu_J, lv_J, run_max, run_sum)


def iw_lse_finalize(run_max: Tensor, run_sum: Tensor, K: int) -> Tensor:
    """``ll = run_max + log(run_sum) - log K``, (n,): the importance-weighted log-likelihood of each point
    after all ``K`` samples were folded in (-inf where every log-weight was -inf)."""
    K = as_count(K, "iw_lse_finalize: K", "; K is the total number of samples folded in")
    if not (isinstance(run_max, Tensor) and isinstance(run_sum, Tensor)) or run_max.shape != run_sum.shape:
        raise ValueError("iw_lse_finalize: expected run_max and run_sum as two (n,) tensors from iw_lse_update, "
                         f"got {getattr(run_max, 'shape', type(run_max).__name__)} and "
                         f"{getattr(run_sum, 'shape', type(run_sum).__name__)}")
    return run_max + torch.log(run_sum) - math.log(K)


def _check_inputs(log_px: Tensor, z: Tensor, mu_J: Tensor, lv_J: Tensor, run_max: Tensor, run_sum: Tensor) -> None:
    """The checks of the C++ op (``csrc/iw_logsumexp.h``), made before either runs: no data is read."""
    names = ("log_px", "z", "mu_J", "lv_J", "run_max", "run_sum")
    for name, t in zip(names, (log_px, z, mu_J, lv_J, run_max, run_sum)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"iw_lse_update: expected {name} as a floating tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if run_max.dtype not in (torch.float32, torch.float64) or run_sum.dtype != run_max.dtype:
        raise TypeError(f"iw_lse_update: expected run_max and run_sum of one dtype, float32 or float64 (from "
                        f"iw_lse_init), got {run_max.dtype} and {run_sum.dtype}")
    if z.dim() != 3:
        raise ValueError(f"iw_lse_update: z must be (n, k, D), got shape {tuple(z.shape)}")
    n, k, D = z.shape
    if tuple(log_px.shape) != (n, k):
        raise ValueError(f"iw_lse_update: log_px must be (n, k) = {(n, k)} to match z, got {tuple(log_px.shape)}")
    if tuple(mu_J.shape) != (n, D) or tuple(lv_J.shape) != (n, D):
        raise ValueError(
            f"iw_lse_update: mu_J and lv_J must be (n, D) = {(n, D)} to match z, "
            f"got {tuple(mu_J.shape)} and {tuple(lv_J.shape)}"
        )
    if tuple(run_max.shape) != (n,) or tuple(run_sum.shape) != (n,):
        raise ValueError(
            f"iw_lse_update: run_max and run_sum must be (n,) = ({n},) to match z, got {tuple(run_max.shape)} "
            f"and {tuple(run_sum.shape)}; start them with iw_lse_init(n, device, dtype)"
        )
    devices = {t.device for t in (log_px, z, mu_J, lv_J, run_max, run_sum)}
    if len(devices) != 1:
        raise ValueError(f"iw_lse_update: all inputs must be on one device, got {sorted(map(str, devices))}")


def iw_lse_update_eager(
    log_px: Tensor, z: Tensor, mu_J: Tensor, lv_J: Tensor, run_max: Tensor, run_sum: Tensor
) -> tuple[Tensor, Tensor]:
    """The eager twin of ``torch.ops.crmvae_fast.iw_lse_update``: same arguments, same result (in
    ``run_max``'s dtype), computed with :func:`crmvae_fast.reference.importance_log_weights` and torch ops."""
    _check_inputs(log_px, z, mu_J, lv_J, run_max, run_sum)
    if z.shape[1] == 0:
        return run_max.clone(), run_sum.clone()
    lw = reference.importance_log_weights(log_px, z, mu_J, lv_J).to(run_max.dtype)  # (n, k)
    new_max = torch.maximum(run_max, lw.amax(dim=-1))  # NaN propagates
    # Where the max is infinite, shift by 0 so exp(-inf - -inf) or exp(inf - inf) = NaN never happens: with
    # every weight -inf there is no mass (the sum stays 0); with a +inf weight the sum counts the +inf weights
    # (>= 1), so ll = +inf.
    infinite = torch.isinf(new_max)
    shift = torch.where(infinite, torch.zeros_like(new_max), new_max)
    new_sum = run_sum * torch.exp(run_max - shift) + torch.exp(lw - shift[:, None]).sum(dim=-1)
    pos_inf = new_max == math.inf
    n_inf = torch.where(run_max == math.inf, run_sum, 0.0) + (lw == math.inf).sum(dim=-1).to(run_sum.dtype)
    return new_max, torch.where(pos_inf, n_inf, new_sum)


def _iw_lse_update_fake(log_px, z, mu_J, lv_J, run_max, run_sum):
    torch._check(z.dim() == 3, lambda: f"iw_lse_update: z must be (n, k, D), got {tuple(z.shape)}")
    torch._check(log_px.shape == z.shape[:2], lambda: "iw_lse_update: log_px must be (n, k) to match z")
    torch._check(run_max.shape == run_sum.shape == z.shape[:1], lambda: "iw_lse_update: run state must be (n,)")
    return run_max.new_empty(run_max.shape), run_sum.new_empty(run_sum.shape)


def _register_fake() -> None:
    """Register the op's fake (meta) function. ``register_fake`` needs the schema, which the C++ library
    declares (``csrc/ops.cpp``), so :func:`crmvae_fast._extension.when_loaded` calls this once it is loaded."""
    torch.library.register_fake(OP_NAME, _iw_lse_update_fake)


_extension.when_loaded(_register_fake)
