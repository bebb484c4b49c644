"""The op registry: every fused op of crmvae_fast declares itself here, once.

An entry (:class:`OpSpec`) names the op's public functions in :mod:`crmvae_fast.ops`, its implementation module
(``crmvae_fast/kernels/<name>.py``: kernels, launchers, custom op with fake and autograd), the torch custom ops
it registers, its eager twin, the backend that runs its fused path (and so on which devices it is live, and
why not where it is off: :func:`crmvae_fast._backend.op_backend`), and the name of its benchmark spec in
:mod:`crmvae_fast.bench.cases`. Everything that used to keep its own list of ops reads this one instead:

* :func:`crmvae_fast.backend_info` reports, for every op, what runs it on CPU and CUDA tensors;
* the benchmark runner (:mod:`crmvae_fast.bench`) and ``crmvae-fast bench --ops`` loop over the benchmark specs;
* ``tests/test_kernels_compile.py`` builds ``compile_configs()`` of every op whose backend is ``"triton"``;
* ``tests/test_registry.py`` checks that every name in ``crmvae_fast.ops.__all__`` is registered, that every
  entry's twin, custom ops, benchmark spec and compile configs exist, and that no ``crmvae_fast::`` custom op is
  left out;
* the extension loader and ``setup.py`` take every ``csrc/*.cpp`` (and ``*.cu`` with CUDA), so a C++ op only
  adds files there.

This module imports nothing of the package (the names are strings, resolved on demand), so any module can
import it without a cycle.

Adding an op ``foo`` (see the README's "Adding an op"): ``crmvae_fast/kernels/foo.py``, its twin in
``crmvae_fast/reference.py``, ``tests/test_foo.py``, a ``BenchSpec`` in ``crmvae_fast/bench/cases.py`` (one
``register_bench(op_bench("foo", fused="crmvae_fast.ops:foo", eager="crmvae_fast.reference:foo"))`` line), one
:class:`OpSpec` entry below and its export in ``crmvae_fast/ops/__init__.py``, and a row of the README's API
table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Tuple

#: What can run an op's fused path; :func:`crmvae_fast._backend.op_backend` says, per device, whether it is live.
#: ``"triton"``: Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
#: ``"extension"``: the C++/CUDA extension built from ``csrc/`` (CPU kernel always, CUDA kernel when built so).
BACKENDS = ("triton", "extension")


@dataclass(frozen=True)
class OpSpec:
    """One fused op. ``functions``: the names it exports in :mod:`crmvae_fast.ops` (the first is the fused
    one). ``twin``: ``"module:function"`` of the eager twin that the tests compare it with and the benchmarks
    time. ``custom_ops``: the ``torch.ops`` names it registers (``"crmvae_fast::name"``). ``backend``: one of
    :data:`BACKENDS`. ``bench``: the name of its ``BenchSpec`` in :mod:`crmvae_fast.bench.cases` (a spec may
    time the op through the model, as ``joint_nll`` does). ``aliases``: other keys under which
    :func:`crmvae_fast.backend_info` reports it. ``summary``: one line for the docs and ``--help``."""

    name: str
    functions: Tuple[str, ...]
    twin: str
    custom_ops: Tuple[str, ...]
    backend: str
    bench: str
    summary: str
    aliases: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"op {self.name!r}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.functions:
            raise ValueError(f"op {self.name!r}: name at least one public function")

    @property
    def module(self) -> str:
        """The implementation module, ``crmvae_fast.kernels.<name>``."""
        return f"{__package__}.kernels.{self.name}"

    def load(self):
        """Import and return the implementation module (this defines its kernels and custom ops)."""
        return importlib.import_module(self.module)

    def twin_function(self):
        """The eager twin, imported."""
        return resolve(self.twin)


def resolve(path: str) -> Any:
    """``"package.module:attr"`` -> the object."""
    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


#: name -> :class:`OpSpec` of every registered op, in registration order.
OPS: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to :data:`OPS`; a second entry under the same name is an error."""
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is registered twice; pick another name or edit the first entry")
    OPS[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    """The entry of op ``name`` (or of one of its aliases)."""
    for spec in OPS.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise KeyError(f"no op {name!r} in the registry; registered: {', '.join(OPS)}")


# ------------------------------------------------------------------------------------------------------- the ops
register(OpSpec(
    name="latent_step",
    functions=("latent_step",),
    twin="crmvae_fast.reference:latent_step",
    custom_ops=("crmvae_fast::latent_step", "crmvae_fast::latent_step_backward"),
    backend="triton",
    bench="latent_step",
    summary="PoE + M + 1 reparameterized samples + every KL, forward and backward in one launch each",
))
register(OpSpec(
    name="poe",
    functions=("poe",),
    twin="crmvae_fast.reference:poe_experts",
    custom_ops=("crmvae_fast::poe", "crmvae_fast::poe_backward"),
    backend="triton",
    bench="poe",
    summary="product of Gaussian experts in the log domain (MultiVae's poe / stable_poe, masks, subsets)",
))
register(OpSpec(
    name="likelihood",
    functions=("likelihood",),
    twin="crmvae_fast.reference:neg_log_likelihood",
    custom_ops=("crmvae_fast::likelihood", "crmvae_fast::likelihood_backward"),
    backend="triton",
    bench="train_step",
    summary="-rescale * sum_features log p(x | recon), masked, one pass (normal, laplace, bernoulli, categorical)",
))
register(OpSpec(
    name="iw_logsumexp",
    functions=("iw_lse_update", "iw_lse_init", "iw_lse_finalize"),
    twin="crmvae_fast.kernels.iw_logsumexp:iw_lse_update_eager",
    custom_ops=("crmvae_fast::iw_lse_update",),
    backend="extension",
    bench="joint_nll",
    summary="importance log-weights folded into a running log-sum-exp (compute_joint_nll's core)",
    aliases=("joint_nll",),
))
