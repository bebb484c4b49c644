"""``crmvae-fast doctor`` (:mod:`crmvae_fast.doctor`): it passes on this machine (eager, extension, and the Triton
interpreter: conftest sets ``TRITON_INTERPRET=1`` for this process), it fails and names the op when an op and
its twin disagree (forward or backward) or an op raises, the other checks still run, and every registered op
has a check case."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import crmvae_fast.ops
import crmvae_fast.reference
from crmvae_fast import _backend, _extension, doctor, registry, versions

from conftest import needs_kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doctor(tmp_path, *argv):
    """Run doctor in this process; ``(exit code, rows)``."""
    path = tmp_path / "doctor.json"
    rc = doctor.main([*argv, "--json", str(path)])
    return rc, json.loads(path.read_text())["rows"]


def test_every_registered_op_has_a_doctor_case():
    assert set(registry.OPS) <= set(doctor.CASES), "add a doctor.CASES entry for " + ", ".join(
        sorted(set(registry.OPS) - set(doctor.CASES)))


def test_an_op_without_a_case_is_a_failed_check(monkeypatch):
    monkeypatch.setitem(registry.OPS, "bogus", registry.OpSpec(
        name="bogus", functions=("bogus",), twin="crmvae_fast.reference:poe", custom_ops=(), backend="triton",
        bench="poe", summary="an op registered without a doctor case"))
    rows = list(doctor.op_rows(["bogus"], ["cpu"]))
    assert [r["verdict"] for r in rows] == ["FAIL"]
    assert "no doctor case" in rows[0]["detail"] and "bogus" in rows[0]["detail"]


def test_doctor_passes_on_this_machine(tmp_path, capsys):
    """Every op on every device here (the Triton ops through the interpreter on a CPU: conftest sets
    ``TRITON_INTERPRET=1``), the extension op, and the model step; the GPU-only checks say why they skip."""
    rc, rows = _doctor(tmp_path)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert not [r for r in rows if r["verdict"] == "FAIL"], out
    for name, spec in registry.OPS.items():
        mine = [r for r in rows if r["check"].split(" ")[0].split("[")[0] == name]
        for device in {r["device"] for r in mine}:
            assert {r["runner"] for r in mine if r["device"] == device} == {_backend.op_backend(spec, device)[0]}
        if _backend.INTERPRET and spec.backend == "triton":
            assert {r["runner"] for r in mine if r["device"] == "cpu"} == {"triton-interpreter"}
        dtypes = {r["dtype"] for r in mine if r["verdict"] == "PASS"}
        assert dtypes == {str(d).replace("torch.", "") for d in doctor.CASES[name].dtypes}, name
        assert any(r["check"].endswith("bwd") and r["verdict"] == "PASS" for r in mine) == bool(
            doctor.CASES[name].grad_args), name
    assert {r["verdict"] for r in rows if r["check"] == "model step vs eager"} == {"PASS"}
    if not torch.cuda.is_available():
        cuda = [r for r in rows if r["device"] == "cuda"]
        assert cuda and {r["verdict"] for r in cuda} == {"SKIP"} and all("no CUDA" in r["detail"] for r in cuda)
    assert "all passed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine's path (eager twins, then the "
                    "interpreter in a child); with a GPU, test_doctor_passes_on_this_machine checks the kernels")
def test_doctor_passes_on_the_eager_path_and_checks_the_interpreter_in_a_child(tmp_path):
    """``TRITON_INTERPRET=0``: the Triton ops run their eager twin on CPU tensors, and ``--interpreter`` re-runs
    their checks in a child process started with ``TRITON_INTERPRET=1``."""
    path = tmp_path / "doctor.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "crmvae_fast.doctor", "--device", "cpu", "--ops", "poe,iw_logsumexp",
                        "--no-model", "--interpreter", "--json", str(path)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(path.read_text())
    assert doc["versions"]["interpreter"] is False
    runners = {(row["check"].split(" ")[0].split("[")[0], row["runner"]) for row in doc["rows"]}
    ext = "extension" if _extension.status()[0] is not None else "eager"
    assert runners == {("poe", "eager"), ("poe", "triton-interpreter"), ("iw_logsumexp", ext)}
    assert {row["verdict"] for row in doc["rows"]} <= {"PASS", "SKIP"}
    assert "eager twin" in r.stdout  # the eager rows say that no kernel ran


def _scaled(fn, factor):
    def wrong(*args, **kwargs):
        return tuple(t * factor for t in fn(*args, **kwargs))
    return wrong


def _wrong_gradient(fn):
    """The same values, but the gradient of mu[0] gets 1 % more (a planted backward-only bug)."""
    def wrong(mu, lv, *args, **kwargs):
        mu_J, lv_J = fn(mu, lv, *args, **kwargs)
        return mu_J + 0.01 * (mu[0] - mu[0].detach()), lv_J
    return wrong


@pytest.mark.parametrize("where", ["fused", pytest.param("twin", marks=needs_kernels), "backward"])
def test_a_planted_mismatch_fails_and_names_the_op(where, device, monkeypatch, tmp_path, capsys):
    """A wrong fused op, a wrong twin (where the fused op runs a kernel, not the twin itself) and a wrong
    gradient with right values each fail their check, and only theirs."""
    monkeypatch.setitem(doctor.CASES, "poe", dataclasses.replace(doctor.CASES["poe"], variants=("mask",),
                                                                 dtypes=(torch.float32,)))  # 2 checks, not 8
    if where == "fused":
        monkeypatch.setattr(crmvae_fast.ops, "poe", _scaled(crmvae_fast.ops.poe, 1.01))
    elif where == "twin":
        monkeypatch.setattr(crmvae_fast.reference, "poe_experts", _scaled(crmvae_fast.reference.poe_experts, 0.99))
    else:
        monkeypatch.setattr(crmvae_fast.ops, "poe", _wrong_gradient(crmvae_fast.ops.poe))
    rc, rows = _doctor(tmp_path, "--device", device.type, "--ops", "poe,iw_logsumexp", "--no-model")
    out = capsys.readouterr().out
    assert rc == 1
    failed = {r["check"] for r in rows if r["verdict"] == "FAIL"}
    direction = "bwd" if where == "backward" else "fwd"
    assert "poe[mask] " + direction in failed and all(c.startswith("poe[mask]") for c in failed)
    if where == "backward":  # right values: only the gradients fail
        assert all(c.endswith("bwd") for c in failed)
    assert all(r["verdict"] in ("PASS", "SKIP") for r in rows if r["check"].startswith("iw_logsumexp"))
    bad = next(r for r in rows if r["check"] == "poe[mask] " + direction and r["dtype"] == "float32")
    assert bad["err_over_tol"] > 1 and "tolerance" in bad["detail"]
    assert "FAILED: poe[mask]" in out


def test_an_op_that_raises_is_a_failed_check_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure\nsecond line")

    monkeypatch.setattr(crmvae_fast.ops, "latent_step", broken)  # the model step calls it too
    rc, rows = _doctor(tmp_path, "--device", "cpu", "--ops", "latent_step,iw_logsumexp")
    assert rc == 1
    by = {(r["check"], r["dtype"]): r for r in rows}
    for dtype in ("float32", "bfloat16"):
        assert by[("latent_step fwd", dtype)]["verdict"] == "FAIL"
        assert by[("latent_step fwd", dtype)]["detail"] == "RuntimeError: planted failure"
        assert by[("latent_step bwd", dtype)]["verdict"] == "SKIP"
    assert by[("model step vs eager", "float32")]["verdict"] == "FAIL"
    assert "planted failure" in by[("model step vs eager", "float32")]["detail"]
    assert by[("iw_logsumexp fwd", "float32")]["verdict"] == "PASS"
    assert by[("iw_logsumexp fwd", "float64")]["verdict"] == "PASS"


@pytest.mark.parametrize("argv", [["--ops", "nope"], ["--ops", ","], ["--device", "tpu"]])
def test_bad_arguments_exit_2_before_any_check(argv, capsys):
    assert doctor.main(argv) == 2
    err = capsys.readouterr()
    assert "error:" in err.err and "crmvae-fast doctor" not in err.out


def test_compare_counts_equal_non_finite_values_as_equal_and_flags_the_rest():
    t = torch.tensor([1.0, float("nan"), math.inf])
    assert doctor.compare([("x", t)], [("x", t.clone())], (0.0, 0.0))[:2] == (0.0, 0.0)
    err, ratio, problem = doctor.compare([("x", t + 1e-3)], [("x", t)], (1e-4, 0.0))
    assert problem == "" and err == pytest.approx(1e-3, rel=1e-3) and ratio == pytest.approx(10.0, rel=1e-3)
    assert "NaN or inf" in doctor.compare([("x", torch.tensor([math.nan]))], [("x", torch.tensor([0.0]))],
                                          (1.0, 1.0))[2]
    assert "the twin gives (2,)" in doctor.compare([("x", torch.zeros(3))], [("x", torch.zeros(2))], (1.0, 1.0))[2]
    assert "float64" in doctor.compare([("x", torch.zeros(2))], [("x", torch.zeros(2, dtype=torch.float64))],
                                       (1.0, 1.0))[2]


def test_versions_against_the_tested_range(monkeypatch):
    info = doctor.version_info()
    assert info["torch"] == torch.__version__ and info["triton"] == _backend.TRITON_VERSION
    lo, hi = versions.tested_range()["torch"]
    assert f"torch {lo} .. {hi}" in info["tested_range"]
    monkeypatch.setattr(versions, "MIN_TORCH", "99.0")  # this torch older than the bound
    info = doctor.version_info()
    assert info["in_range"].startswith("OUTSIDE") and "torch" in info["in_range"] and "triton" not in info["in_range"]
    monkeypatch.setattr(versions, "MIN_TORCH", "1.0")
    monkeypatch.setattr(versions, "TESTED", (versions.TestedRun(torch.__version__, _backend.TRITON_VERSION or "3.4.0",
                                                                "3", "", "", ""),))
    assert doctor.version_info()["in_range"] == "yes"
