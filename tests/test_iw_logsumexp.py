"""``crmvae_fast.ops.iw_logsumexp``: the C++/CUDA op ``torch.ops.crmvae_fast.iw_lse_update`` (csrc/) and its
eager twin against ``reference.iw_logsumexp(reference.importance_log_weights(...))`` over all K at once."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crmvae_fast import _extension, reference
from crmvae_fast.ops import iw_lse_finalize, iw_lse_init, iw_lse_update
from crmvae_fast.kernels.iw_logsumexp import iw_lse_update_eager

# Per-dtype tolerances on ll. The CPU kernel accumulates in double; the CUDA kernel in the input dtype, so a
# float32 log-weight of size 1e4 carries about 1e-3 of rounding.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-3), torch.float64: dict(rtol=1e-10, atol=1e-8)}

# (n, K, chunk, D): chunks that do not divide K, single points, single samples, D = 1 and odd D.
SHAPES = [(1, 1, 3, 1), (5, 7, 3, 3), (1, 7, 3, 33), (5, 1000, 64, 33), (5, 1000, 100, 1), (5, 1001, 100, 3)]
REGIMES = ["normal", "huge", "point_neg_inf", "mixed_neg_inf"]


def _ext_or_skip(device_type: str):
    """The op namespace when the extension has a kernel for ``device_type``, else skip saying why."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the CUDA kernel is only compile-tested (test_extension_build)")
    ops = _extension.load()
    if ops is None:
        pytest.skip(f"C++ extension not available: {_extension.status()[1]}")
    if not _extension.has_kernel(device_type):
        pytest.skip(f"extension has no {device_type} kernel: {_extension.status()[1]}")
    return ops


def _inputs(n, K, D, dtype, device, regime, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_px = 10 * torch.randn(n, K, generator=g, dtype=torch.float64)
    if regime == "huge":  # log-weights at +-1e4: exp would overflow/underflow without the running max
        log_px = 1e4 * torch.sign(torch.randn(n, K, generator=g, dtype=torch.float64)) + log_px
    elif regime == "point_neg_inf":  # a point with no mass at all: ll = -inf, never NaN
        log_px[0] = -math.inf
    elif regime == "mixed_neg_inf":
        log_px[torch.rand(n, K, generator=g) < 0.5] = -math.inf
        log_px[:, 0] = -math.inf  # the first chunk of some points may be all -inf
    mu_J = torch.randn(n, D, generator=g, dtype=torch.float64)
    lv_J = 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)
    z = mu_J[:, None] + torch.exp(0.5 * lv_J)[:, None] * torch.randn(n, K, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (log_px, z, mu_J, lv_J)]


def _expected(log_px, z, mu_J, lv_J):
    """The eager twin over all K at once, in float64 from the same (rounded) inputs."""
    lw = reference.importance_log_weights(log_px.double(), z.double(), mu_J.double(), lv_J.double())
    return reference.iw_logsumexp(lw)


def _chunked(update, log_px, z, mu_J, lv_J, chunk):
    n, K = log_px.shape
    state = iw_lse_init(n, log_px.device, log_px.dtype)
    for s in range(0, K, chunk):
        state = update(log_px[:, s : s + chunk], z[:, s : s + chunk], mu_J, lv_J, *state)
    return iw_lse_finalize(*state, K)


def _op(log_px, z, mu_J, lv_J, run_max, run_sum):
    return torch.ops.crmvae_fast.iw_lse_update(log_px, z, mu_J, lv_J, run_max, run_sum)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("n,K,chunk,D", SHAPES)
def test_op_matches_reference(device_type, dtype, regime, n, K, chunk, D):
    _ext_or_skip(device_type)
    inputs = _inputs(n, K, D, dtype, device_type, regime)
    got = _chunked(_op, *inputs, chunk)
    assert got.dtype == dtype and got.shape == (n,)
    assert not torch.isnan(got).any()
    if regime == "point_neg_inf":
        assert got[0].item() == -math.inf
    torch.testing.assert_close(got.double().cpu(), _expected(*inputs).cpu(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("n,K,chunk,D", SHAPES)
def test_eager_twin_matches_reference(dtype, regime, n, K, chunk, D, device):
    inputs = _inputs(n, K, D, dtype, device, regime)
    got = _chunked(iw_lse_update_eager, *inputs, chunk)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double().cpu(), _expected(*inputs).cpu(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_public_api_independent_of_chunk_size(dtype, device):
    inputs = _inputs(3, 257, 5, dtype, device, "mixed_neg_inf", seed=1)
    results = [_chunked(iw_lse_update, *inputs, chunk) for chunk in (1, 7, 100, 257, 1000)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], **TOL[dtype])
    torch.testing.assert_close(results[0].double(), _expected(*inputs), **TOL[dtype])


def test_public_api_low_precision_inputs_run_in_float32(device):
    inputs = _inputs(4, 50, 6, torch.float32, device, "normal", seed=2)
    half = [t.to(torch.bfloat16) for t in inputs]
    state = iw_lse_init(4, device, torch.bfloat16)
    assert state[0].dtype == torch.float32
    got = iw_lse_finalize(*iw_lse_update(*half, *state), 50)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _expected(*half), **TOL[torch.float32])


def test_op_does_not_modify_inputs():
    _ext_or_skip("cpu")
    inputs = _inputs(3, 9, 4, torch.float64, "cpu", "mixed_neg_inf")
    state = iw_lse_init(3, "cpu", torch.float64)
    before = [t.clone() for t in inputs + list(state)]
    _op(*inputs, *state)
    for a, b in zip(before, inputs + list(state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_non_contiguous_inputs():
    _ext_or_skip("cpu")
    log_px, z, mu_J, lv_J = _inputs(4, 10, 6, torch.float64, "cpu", "normal")
    state = iw_lse_init(4, "cpu", torch.float64)
    z_t = z.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    got = iw_lse_finalize(*_op(log_px.t().contiguous().t(), z_t, mu_J, lv_J, *state), 10)
    torch.testing.assert_close(got, _expected(log_px, z, mu_J, lv_J), **TOL[torch.float64])


def test_opcheck_cpu():
    _ext_or_skip("cpu")
    for regime, (n, k, D) in [("normal", (5, 7, 3)), ("mixed_neg_inf", (1, 3, 1))]:
        inputs = _inputs(n, k, D, torch.float32, "cpu", regime)
        state = iw_lse_init(n, "cpu", torch.float32)
        torch.library.opcheck(torch.ops.crmvae_fast.iw_lse_update.default, (*inputs, *state))


def test_public_api_under_torch_compile_fullgraph():
    _ext_or_skip("cpu")
    inputs = _inputs(5, 20, 3, torch.float32, "cpu", "normal")

    def nll(log_px, z, mu_J, lv_J):
        state = iw_lse_init(log_px.shape[0], log_px.device, log_px.dtype)
        state = iw_lse_update(log_px, z, mu_J, lv_J, *state)
        return -iw_lse_finalize(*state, log_px.shape[1]).sum()

    compiled = torch.compile(nll, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), nll(*inputs))


def _bad(what):
    log_px, z, mu_J, lv_J = _inputs(3, 4, 5, torch.float32, "cpu", "normal")
    run_max, run_sum = iw_lse_init(3, "cpu", torch.float32)
    args = dict(log_px=log_px, z=z, mu_J=mu_J, lv_J=lv_J, run_max=run_max, run_sum=run_sum)
    args.update(what(args))
    return list(args.values())


BAD = {
    "z_2d": (lambda a: {"z": a["z"][:, :, 0]}, "z must be \\(n, k, D\\)"),
    "log_px_wrong_k": (lambda a: {"log_px": a["log_px"][:, :3]}, "log_px must be \\(n, k\\) = \\(3, 4\\)"),
    "mu_wrong_D": (lambda a: {"mu_J": a["mu_J"][:, :4]}, "mu_J and lv_J must be \\(n, D\\) = \\(3, 5\\)"),
    "state_wrong_n": (lambda a: {"run_max": a["run_max"][:2]}, "run_max and run_sum must be \\(n,\\) = \\(3,\\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_shapes_raise_clear_errors(case):
    make, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        iw_lse_update_eager(*_bad(make))
    _ext_or_skip("cpu")
    with pytest.raises(ValueError, match=msg):
        _op(*_bad(make))
    with pytest.raises(ValueError, match=msg):
        iw_lse_update(*_bad(make))


def test_bad_dtypes_raise_clear_errors():
    _ext_or_skip("cpu")
    with pytest.raises(ValueError, match="all inputs must share z's dtype Float, got log_px of dtype Double"):
        _op(*_bad(lambda a: {"log_px": a["log_px"].double()}))
    with pytest.raises(ValueError, match="expected float32 or float64 tensors, got z of dtype Half"):
        _op(*_bad(lambda a: {k: v.half() for k, v in a.items()}))


def test_finalize_rejects_bad_K():
    with pytest.raises(ValueError, match="K must be an int >= 1, got 0"):
        iw_lse_finalize(*iw_lse_init(2), 0)
    for bad in (2.5, 2.0, True, "2"):  # before: K=2.5 silently used 2
        with pytest.raises(TypeError, match=r"iw_lse_finalize: K must be an int >= 1 \(a Python or numpy integer\)"):
            iw_lse_finalize(*iw_lse_init(2), bad)
    torch.testing.assert_close(iw_lse_finalize(torch.zeros(1), torch.ones(1), np.int64(4)), -torch.tensor([math.log(4)]))


# Special log-weights, one row per point: (log-weights in chunks of 2, the documented ll). +inf anywhere gives
# +inf (before: NaN); all -inf gives -inf; NaN anywhere gives NaN, NaN winning over +inf.
INF, NAN = math.inf, math.nan
SPECIAL = {
    "one_pos_inf": ([0.0, INF, -1.0, 2.0, 3.0], INF),
    "pos_inf_first": ([INF, 0.0, 1.0], INF),
    "pos_inf_last_chunk": ([0.0, 1.0, 2.0, 3.0, INF], INF),
    "all_pos_inf": ([INF, INF, INF], INF),
    "pos_and_neg_inf": ([-INF, INF, -INF], INF),
    "all_neg_inf": ([-INF, -INF, -INF], -INF),
    "nan": ([0.0, NAN, 1.0], NAN),
    "nan_and_pos_inf": ([INF, 0.0, NAN], NAN),
    "pos_inf_then_nan": ([INF, 0.0, 1.0, 2.0, NAN], NAN),
    "nan_and_neg_inf": ([-INF, NAN, -INF], NAN),
    "finite": ([0.0, 1.0, -2.0], None),
}


def _special_inputs(dtype, device):
    """log_px holding the special values, z = mu_J = lv_J = 0 so that log w = log_px exactly; rows padded with
    -inf (no mass) to one length."""
    k = max(len(v) for v, _ in SPECIAL.values())
    rows = [v + [-INF] * (k - len(v)) for v, _ in SPECIAL.values()]
    log_px = torch.tensor(rows, dtype=dtype, device=device)
    n = len(rows)
    z = torch.zeros(n, k, 2, dtype=dtype, device=device)
    zeros = torch.zeros(n, 2, dtype=dtype, device=device)
    return log_px, z, zeros, zeros.clone()


def _check_special(got):
    K = max(len(v) for v, _ in SPECIAL.values())
    for i, (name, (vals, want)) in enumerate(SPECIAL.items()):
        g = got[i].item()
        if want is None:
            assert g == pytest.approx(math.log(sum(math.exp(v) for v in vals)) - math.log(K), rel=1e-6), name
        elif math.isnan(want):
            assert math.isnan(g), f"{name}: expected NaN, got {g}"
        else:
            assert g == want, f"{name}: expected {want}, got {g}"


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("impl", ["eager", "cpu", "cuda"])
def test_special_log_weights(impl, dtype, chunk, device):
    if impl == "eager":
        update = iw_lse_update_eager
    else:
        _ext_or_skip(impl)
        update, device = _op, impl
    got = _chunked(update, *_special_inputs(dtype, device), chunk).cpu()
    _check_special(got)


def test_special_log_weights_public_api(device):
    _check_special(_chunked(iw_lse_update, *_special_inputs(torch.float32, device), 2).cpu())


def test_pos_inf_state_is_finite_count():
    """A +inf log-weight leaves (run_max, run_sum) = (+inf, number of +inf weights): finalize gives +inf."""
    log_px, z, mu_J, lv_J = _special_inputs(torch.float64, "cpu")
    impls = [iw_lse_update_eager] + ([_op] if _extension.has_kernel("cpu") else [])
    for update in impls:
        run_max, run_sum = update(log_px, z, mu_J, lv_J, *iw_lse_init(len(log_px), "cpu", torch.float64))
        i = list(SPECIAL).index("all_pos_inf")
        assert run_max[i].item() == INF and run_sum[i].item() == 3.0, update
        i = list(SPECIAL).index("one_pos_inf")
        assert run_max[i].item() == INF and run_sum[i].item() == 1.0, update


def test_fallback_warns_once_and_uses_eager_twin(monkeypatch):
    monkeypatch.delenv("CRMVAE_FAST_REQUIRE_EXT", raising=False)
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_kernels", {})
    monkeypatch.setattr(_extension, "_try_load", lambda: (False, "simulated build failure"))
    with pytest.warns(RuntimeWarning, match="simulated build failure") as record:
        assert _extension.load() is None
        assert _extension.status() == (None, "simulated build failure")
        inputs = _inputs(2, 5, 3, torch.float64, "cpu", "normal")
        got = _chunked(iw_lse_update, *inputs, 2)
    assert sum("simulated build failure" in str(w.message) for w in record) == 1  # one warning, not one per call
    torch.testing.assert_close(got, _expected(*inputs), **TOL[torch.float64])


def test_require_ext_turns_fallback_into_error(monkeypatch):
    monkeypatch.setenv("CRMVAE_FAST_REQUIRE_EXT", "1")
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_kernels", {})
    monkeypatch.setattr(_extension, "_try_load", lambda: (False, "simulated build failure"))
    with pytest.raises(RuntimeError, match="CRMVAE_FAST_REQUIRE_EXT=1 .*simulated build failure"):
        _extension.status()


@pytest.mark.skipif(
    os.environ.get("CRMVAE_FAST_REQUIRE_EXT", "0") != "1",
    reason="CRMVAE_FAST_REQUIRE_EXT is not 1: the extension may fall back to the eager twin here",
)
def test_extension_is_really_used_when_required():
    kind, reason = _extension.status()
    assert kind in ("cpu", "cuda"), reason
    if torch.cuda.is_available():
        assert kind == "cuda", reason


def _python_ll(vals):
    """The documented ll of one point's log-weights, in Python floats: NaN if any is NaN, else +inf if any is
    +inf, else -inf if all are -inf, else logsumexp - log K."""
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(v == INF for v in vals):
        return INF
    finite = [v for v in vals if v != -INF]
    if not finite:
        return -INF
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite)) - math.log(len(vals))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4).flatmap(lambda k: st.lists(st.lists(
        st.one_of(st.floats(-1e4, 1e4), st.sampled_from([INF, -INF, NAN])), min_size=k, max_size=k),
        min_size=1, max_size=4)),
    chunk=st.integers(1, 4),
    double=st.booleans(),
)
def test_property_special_log_weights(rows, chunk, double):
    """Any mix of finite, +inf, -inf and NaN log-weights in any chunking: the eager twin and the C++ op give
    the documented ll (float64 Python reference)."""
    dtype = torch.float64 if double else torch.float32
    log_px = torch.tensor(rows, dtype=dtype)
    n, k = log_px.shape
    z = torch.zeros(n, k, 1, dtype=dtype)
    zeros = torch.zeros(n, 1, dtype=dtype)
    want = [_python_ll([float(v) for v in row]) for row in log_px.double()]
    impls = [iw_lse_update_eager] + ([_op] if _extension.has_kernel("cpu") else [])
    for update in impls:
        got = _chunked(update, log_px, z, zeros, zeros.clone(), chunk)
        for g, w in zip(got.tolist(), want):
            if math.isnan(w) or math.isinf(w):
                assert (math.isnan(g) and math.isnan(w)) or g == w, (update, rows, g, w)
            else:
                assert g == pytest.approx(w, rel=1e-5, abs=1e-4), (update, rows, g, w)
