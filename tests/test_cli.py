"""The ``crmvae-fast`` command and the benchmark library's bookkeeping. Nothing here is timed: the bench runs
use tiny sizes and only their rows' structure is checked."""

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crmvae_fast import bench, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_prints_the_keys(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("triton", "interpreter", "extension", "latent_step", "joint_nll"):
        assert key in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"triton", "interpreter", "extension"} <= set(info)


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "crmvae_fast", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("info", "bench", "train"):
        assert cmd in r.stdout


def test_version(capsys):
    import crmvae_fast

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"crmvae-fast {crmvae_fast.__version__}"


@pytest.mark.parametrize("command,option,default", [("train", "--epochs", "10"), ("train", "--seed", "0"),
                                                    ("train", "--lr", "0.001"), ("train", "--batch-size", "128"),
                                                    ("bench", "--dtype", "float32")])
def test_help_shows_defaults(capsys, command, option, default):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    after = text.split(option, 2)[2]  # the option's help line (the first mention is the usage line)
    assert f"(default: {default})" in after.split(" --")[0], after[:200]


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        cli.main([])


def test_train_saves_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--n-train", "48", "--n-test", "8", "--batch-size", "16",
            "--nll-k", "10", "--out", str(out), "--quiet", "--device", "cpu"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1" in text and "samples/s" in text and "joint NLL" in text
    assert {"model_config.json", "model.pt", "environment.json"} <= set(os.listdir(out))
    from crmvae_fast import CRMVAE

    model = CRMVAE.load_from_folder(str(out))
    assert model.model_config.input_dims["image"] == (1, 12, 12)
    saved = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model_state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])


def test_train_folder_loads_in_multivae(tmp_path):
    pytest.importorskip("multivae", reason="multivae is not installed: cannot check MultiVae reads the folder")
    from multivae.models import CRMVAE as MVCRMVAE

    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--n-train", "16", "--n-test", "4", "--batch-size", "16",
                     "--nll-k", "4", "--out", str(out), "--quiet", "--no-fast-kernels", "--device", "cpu"]) == 0
    mv = MVCRMVAE.load_from_folder(str(out))
    assert set(mv.encoders) == {"image", "vector", "label"}


def _check_rows(rows, ops):
    assert rows, "no rows written"
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r), set(bench.ROW_KEYS) - set(r)
        assert r["op"] in ops
        assert r["device"] in ("cpu", "cuda")
        assert r["torch"] == torch.__version__
        if r["skipped"] is None:
            assert r["median_ms"] is not None and r["median_ms"] >= 0
            assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        else:
            assert isinstance(r["skipped"], str) and r["skipped"]
    assert {r["op"] for r in rows} == set(ops)
    # One run: one run_id, the same environment fields everywhere.
    assert len({r["run_id"] for r in rows}) == 1


def test_bench_smoke_writes_rows(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    plot = tmp_path / "speedup.png"
    assert cli.main(["bench", "--smoke", "--json", str(path), "--plot", str(plot),
                     "--providers", "eager,fused,multivae", "--quiet"]) == 0
    rows = bench.read_rows(str(path))
    _check_rows(rows, bench.OPS)
    assert not os.path.exists(str(path) + ".partial")
    ran = {(r["op"], r["mode"], r["provider"]) for r in rows if r["skipped"] is None}
    for mode in ("fwd", "bwd", "full"):
        assert ("latent_step", mode, "eager") in ran and ("latent_step", mode, "fused") in ran
    assert ("train_step", "step", "fused") in ran
    assert ("joint_nll", "eval", "fused") in ran
    for r in rows:
        if r["op"] == "latent_step":
            assert r["bytes"] == bench.latent_step_bytes(r["M"], r["B"], r["D"], r["mode"], 4)
        if r["provider"] == "eager" and r["skipped"] is None and r["op"] != "joint_nll":
            assert r["speedup"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "speed-up" in out and "rows appended" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not available" in out
    else:
        assert plot.exists() and plot.stat().st_size > 0


def test_bench_quick_json(tmp_path):
    # --quick through the CLI, kept cheap under the Triton interpreter: the joint NLL (C++ extension or eager,
    # no interpreter) with the fused provider, and compile, which says why it does not apply.
    path = tmp_path / "q.jsonl"
    assert cli.main(["bench", "--quick", "--json", str(path), "--no-plot", "--ops", "joint_nll",
                     "--providers", "fused,compile", "--quiet"]) == 0
    rows = bench.read_rows(str(path))
    _check_rows(rows, ["joint_nll"])
    by = {r["provider"]: r for r in rows}
    assert by["fused"]["skipped"] is None and by["fused"]["params"]["K"] == 1000
    assert "compile" in by and by["compile"]["skipped"]


def test_bench_rejects_unknown_provider(capsys):
    assert cli.main(["bench", "--smoke", "--providers", "nope"]) == 2


def test_compile_provider_row_or_reason(tmp_path):
    # compile either runs or says why not; never silently missing.
    path = tmp_path / "c.jsonl"
    assert cli.main(["bench", "--smoke", "--json", str(path), "--no-plot", "--ops", "latent_step",
                     "--providers", "eager,compile", "--quiet"]) == 0
    rows = [r for r in bench.read_rows(str(path)) if r["provider"] == "compile"]
    assert len(rows) == 3
    for r in rows:
        assert r["skipped"] is None or r["skipped"]


def test_summarize_quantiles():
    s = bench.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s["median_ms"] == 3.0 and s["reps"] == 5
    assert s["q20_ms"] == pytest.approx(1.8) and s["q80_ms"] == pytest.approx(4.2)
    assert bench.summarize([])["median_ms"] is None


def test_latent_bytes_formula():
    M, B, D = 5, 4096, 512
    fwd = bench.latent_step_bytes(M, B, D, "fwd")
    bwd = bench.latent_step_bytes(M, B, D, "bwd")
    assert fwd == 4 * (2 * M * B * D + 3 * B * D + M * B * D) + M * B + 4 * (M + 1) * B
    assert bwd == 4 * (B * D + 5 * M * B * D) + M * B + 4 * (M + 1) * B
    assert bench.latent_step_bytes(M, B, D, "full") == fwd + bwd
    assert bench.latent_step_bytes(M, B, D, "fwd", elem=2) < fwd


def test_speedups_and_table():
    env = {"run_id": "r", "date": "2026-01-01T00:00:00+00:00"}
    case = bench.Case("latent_step", "fwd", 2, 8, 4)
    dev = torch.device("cpu")
    rows = [bench.make_row(env, case, "eager", dev, stats=bench.summarize([2.0])),
            bench.make_row(env, case, "fused", dev, stats=bench.summarize([0.5])),
            bench.make_row(env, case, "compile", dev, skipped="no compiler")]
    bench.attach_speedups(rows)
    assert rows[1]["speedup"] == pytest.approx(4.0) and rows[1]["baseline"] == "eager"
    assert rows[2]["speedup"] is None
    table = bench.format_table(rows)
    assert "4.00x vs eager" in table and "no compiler" in table
    assert not math.isnan(rows[0]["gbps"])


def test_make_table_without_gpu_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    env = bench.environment(torch.device("cpu"))
    case = bench.Case("latent_step", "fwd", 2, 8, 4)
    bench.append_rows(bench.attach_speedups([
        bench.make_row(env, case, "eager", torch.device("cpu"), stats=bench.summarize([2.0])),
        bench.make_row(env, case, "fused", torch.device("cpu"), stats=bench.summarize([1.0]))]), str(path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_table.py"), str(path)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 0, r.stderr
    assert "not been measured on a GPU yet" in r.stdout


def test_no_speedup_between_rows_of_the_same_backend():
    # On a CPU without the interpreter the fused latent step runs its eager twin: the fused row ran the same
    # backend as the eager baseline, so it gets no speed-up (the table says why) instead of a meaningless one.
    env = {"run_id": "r", "date": "2026-01-01T00:00:00+00:00"}
    case = bench.Case("latent_step", "fwd", 2, 8, 4)
    dev = torch.device("cpu")
    rows = [bench.make_row(env, case, "eager", dev, stats=bench.summarize([2.0])),
            bench.make_row(env, case, "fused", dev, stats=bench.summarize([1.9]))]
    rows[1]["backend"] = "eager"  # as backend_of says where Triton cannot take CPU tensors
    bench.attach_speedups(rows)
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[1]["speedup"] is None and rows[1]["baseline"] == "eager"
    assert "same backend" in rows[1]["note"]
    table = bench.format_table(rows)
    fused_line = next(ln for ln in table.splitlines() if "  fused  " in ln)
    assert "same backend as eager" in fused_line and "x vs eager" not in fused_line


def test_bench_cli_prints_no_speedup_for_the_eager_fallback(tmp_path):
    # The whole CLI in a process without TRITON_INTERPRET (as a newcomer runs it on a laptop), results to the
    # default place: ./crmvae_fast_bench/results.jsonl in the working directory, not the package checkout.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="0",
               CUDA_VISIBLE_DEVICES="")
    env.pop("CRMVAE_BENCH_JSON", None)
    r = subprocess.run([sys.executable, "-m", "crmvae_fast", "bench", "--smoke", "--ops", "latent_step",
                        "--providers", "eager,fused", "--no-plot", "--quiet"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    path = tmp_path / "crmvae_fast_bench" / "results.jsonl"
    assert path.exists(), r.stdout
    rows = bench.read_rows(str(path))
    fused = [x for x in rows if x["provider"] == "fused"]
    assert len(fused) == 3 and all(x["backend"] == "eager" and x["speedup"] is None for x in fused)
    assert "x vs eager" not in "\n".join(ln for ln in r.stdout.splitlines() if " fused " in ln)
    assert "same backend as eager" in r.stdout
    assert str(path) in r.stdout


def test_default_results_path_is_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("CRMVAE_BENCH_JSON", raising=False)
    monkeypatch.chdir(tmp_path)
    assert bench.default_results_path() == str(tmp_path / "crmvae_fast_bench" / "results.jsonl")
    monkeypatch.setenv("CRMVAE_BENCH_JSON", str(tmp_path / "x.jsonl"))
    assert bench.default_results_path() == str(tmp_path / "x.jsonl")


def test_op_bench_builds_a_spec_that_runs(monkeypatch):
    # op_bench is the one-call BenchSpec for a new tensor op: here it wraps the latent step and its twin under a
    # test name, and every mode of the eager and fused providers builds, runs and gives a row.
    spec = bench.op_bench("latent_step_via_op_bench", fused="crmvae_fast.ops:latent_step",
                          eager="crmvae_fast.bench.cases:_eager_latent_step", uses=("latent_step",))
    monkeypatch.setitem(bench.SPECS, spec.name, spec)
    dev = torch.device("cpu")
    cases = spec.cases(dev, False, True, "float32")
    assert [c.mode for c in cases] == ["fwd", "bwd", "full"] and all(c.op == spec.name for c in cases)
    env = bench.environment(dev)
    for case in cases:
        for provider in ("eager", "fused"):
            fn, _ = bench.build(case, provider, dev)
            out = fn()
            if case.mode == "fwd":
                assert out.z.shape == (case.M, case.B, case.D)
            else:
                assert [g.shape for g in out] == [(case.M, case.B, case.D)] * 2
                assert all(torch.isfinite(g).all() for g in out)
    for provider in ("eager", "fused"):  # one row each through the runner (its spec found in SPECS)
        row = bench.run_case(cases[-1], provider, dev, env, smoke=True, log=None)
        assert row["skipped"] is None and row["median_ms"] > 0 and row["op"] == spec.name
    assert bench.skip_reason(cases[0], "multivae", dev) == \
        "multivae is not a provider of latent_step_via_op_bench (its providers: eager, fused, compile)"


def test_train_compile_runs_the_compiled_step_with_fused_adam(tmp_path, capsys, monkeypatch):
    """``train --compile``: the step goes through torch.compile(fullgraph=True) and Adam is fused. On a CPU
    the inductor backend (a C++ build per graph) is swapped for aot_eager to keep the test quick; the flags the
    command passes are checked."""
    calls = []
    real_compile = torch.compile

    def spy_compile(model, **kw):
        calls.append(kw)
        if torch.cuda.is_available():
            return real_compile(model, **kw)
        return real_compile(model, fullgraph=kw["fullgraph"], dynamic=kw.get("dynamic"), backend="aot_eager")

    adams = []
    real_adam = torch.optim.Adam

    def spy_adam(params, **kw):
        adams.append(kw)
        return real_adam(params, **kw)

    monkeypatch.setattr(torch, "compile", spy_compile)
    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    torch._dynamo.reset()
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--n-train", "32", "--n-test", "4", "--batch-size", "16",
                     "--nll-k", "4", "--out", str(out), "--quiet", "--compile"]) == 0
    text = capsys.readouterr().out
    assert "reduce-overhead" in text and "loss/sample nan" not in text
    assert calls == [dict(mode="reduce-overhead", fullgraph=True, dynamic=False)]
    assert adams and adams[0].get("fused") is True


# ------------------------------------------------------------- device-independent figures beside the timings
def _smoke_case(op, mode):
    dev = torch.device("cpu")
    return next(c for c in bench.SPECS[op].cases(dev, False, True, "float32") if c.mode == mode)


def test_train_step_rows_carry_counted_launches_and_modelled_bytes():
    from crmvae_fast import _backend

    dev = torch.device("cpu")
    case = _smoke_case("train_step", "step")
    env = bench.environment(dev)
    rows = {p: bench.run_case(case, p, dev, env, smoke=True, log=None) for p in ("eager", "fused")}
    for r in rows.values():
        assert r["skipped"] is None and r["figures_reason"] is None
        assert r["counts_B"] == case.B  # the smoke size is cheap to count at its own B
        assert r["launches"] == r["aten_launches"] + r["triton_launches"] > 0 and r["bytes_modelled"] > 0
        assert r["modelled"] is None  # the kernel-report fields stay empty on a train step
    eager, fused = rows["eager"], rows["fused"]
    assert eager["triton_launches"] == 0
    assert fused["launches"] < eager["launches"] and fused["bytes_modelled"] < eager["bytes_modelled"]
    if _backend.triton_runs_on(dev):  # the fused kernels ran: one latent step + one likelihood per modality, fwd+bwd
        assert fused["triton_launches"] == 2 * (1 + case.M)
        # the launches do not depend on B (which is why a slow count may be taken at COUNT_SMALL_B); bytes do
        big = bench.Case(case.op, case.mode, case.M, 2 * case.B, case.D, case.dtype, dict(case.params))
        again = bench.SPECS["train_step"].figures(big, "fused", dev)
        assert again["launches"] == fused["launches"] and again["bytes_modelled"] > fused["bytes_modelled"]
    table = bench.format_table(list(rows.values()))
    assert f"{fused['launches']} launches ({fused['triton_launches']} triton)" in table and "MB modelled" in table


def test_counts_batch_is_small_only_under_the_interpreter(monkeypatch):
    from crmvae_fast import _backend

    case = bench.Case("train_step", "step", 2, 256, 32, "float32", {"features": 64})
    monkeypatch.setattr(_backend, "INTERPRET", True)
    assert bench.counts_batch(case, torch.device("cpu")) == bench.COUNT_SMALL_B
    assert bench.counts_batch(case, torch.device("cuda")) == 256
    monkeypatch.setattr(_backend, "INTERPRET", False)
    assert bench.counts_batch(case, torch.device("cpu")) == 256


def test_latent_step_fused_rows_carry_modelled_kernel_figures():
    pytest.importorskip("triton", reason="no triton: no kernels to model")
    dev = torch.device("cpu")
    env = bench.environment(dev)
    rows = {m: bench.run_case(_smoke_case("latent_step", m), "fused", dev, env, smoke=True, log=None)
            for m in ("fwd", "bwd", "full")}
    for m, r in rows.items():
        assert r["skipped"] is None and r["figures_reason"] is None, r["figures_reason"]
        assert r["modelled"] is True and r["warp_instr_per_element"] > 0 and r["bytes_per_element"] > 0
        assert r["registers"] > 0 and 0 < r["occupancy"] <= 1 and r["spills"] >= 0
        assert r["H100_issue_us"] > 0 and r["H100_memory_us"] > 0 and r["launches"] is None
    assert [len(rows[m]["modelled_kernels"]) for m in ("fwd", "bwd", "full")] == [1, 1, 2]
    assert "_fwd_" in rows["fwd"]["modelled_kernels"][0] and "_bwd_" in rows["bwd"]["modelled_kernels"][0]
    for k in ("warp_instr_per_element", "bytes_per_element", "H100_issue_us", "H200_memory_us"):
        assert rows["full"][k] == pytest.approx(rows["fwd"][k] + rows["bwd"][k])
    eager = bench.run_case(_smoke_case("latent_step", "fwd"), "eager", dev, env, smoke=True, log=None)
    assert eager["modelled"] is None and eager["warp_instr_per_element"] is None
    assert "warp-instr/el" in bench.format_table(list(rows.values()) + [eager])


def test_latent_figures_compile_once_per_size_and_a_failure_is_a_reason(monkeypatch):
    from crmvae_fast import kernel_report
    from crmvae_fast.bench import cases

    calls = []

    def failing(M, B, D, dtype):
        calls.append((M, B, D, dtype))
        raise RuntimeError("kernel report: compiling the kernels for sm_90 failed (exit 1):\nno ptxas")

    monkeypatch.setattr(cases, "_KERNEL_FIGURES", {})
    monkeypatch.setattr(kernel_report, "analyze", failing)
    figures = bench.SPECS["latent_step"].figures
    dev = torch.device("cpu")
    out = [figures(_smoke_case("latent_step", m), "fused", dev) for m in ("fwd", "bwd", "full")]
    assert len(calls) == 1  # one compilation for the three modes of a size
    assert all(o["modelled"] is True and "RuntimeError" in o["figures_reason"] and "sm_90" in o["figures_reason"]
               and "warp_instr_per_element" not in o for o in out)
    assert figures(_smoke_case("latent_step", "fwd"), "eager", dev) == {}
    # through the runner: the row is made, timed, and says why it has no figures
    row = bench.run_case(_smoke_case("latent_step", "fwd"), "fused", dev, bench.environment(dev), smoke=True,
                         log=None)
    assert row["skipped"] is None and row["median_ms"] > 0 and "sm_90" in row["figures_reason"]
    assert "no figures" in bench.format_table([row])


# ------------------------------------------------------------------------- bad input: one line, exit 2, before work
def _error_line(err: str, command: str) -> str:
    """The one error line of stderr (argparse's usage lines aside); fails unless there is exactly one, in the
    form ``crmvae-fast <command>: error: ...``, and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln and not ln.startswith("usage:") and not ln.startswith(" ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"crmvae-fast {command}: error: "), err
    return lines[0]


def _refused(capsys, argv) -> str:
    """Runs ``argv`` in-process; it must exit 2 (argparse's SystemExit or main's return) with one error line."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2, argv
    return _error_line(capsys.readouterr().err, argv[0])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small saved CRMVAE (synthetic modalities, latent 4, eager) and a dataset file for it."""
    from crmvae_fast import CRMVAE, CRMVAEConfig, synthetic

    root = tmp_path_factory.mktemp("cli")
    model = CRMVAE(CRMVAEConfig(**synthetic.model_config_kwargs(latent_dim=4)), fast_kernels=False)
    model.save(str(root / "model"))
    torch.save(synthetic.make_dataset(6, seed=2, missing_rate=0.3), root / "data.pt")
    return root


def _bad_cases(root):
    """(argv, words the error line must hold) for every argument of every command."""
    f = str(root / "data.pt")  # an existing file
    m = str(root / "model")
    return [
        (["train", "--latent-dim", "0"], "--latent-dim"), (["train", "--missing-rate", "1.5"], "[0, 1)"),
        (["train", "--missing-rate", "1"], "[0, 1)"), (["train", "--missing-rate", "-0.1"], "[0, 1)"),
        (["train", "--lr", "-1"], "--lr"), (["train", "--lr", "0"], "--lr"), (["train", "--lr", "nan"], "--lr"),
        (["train", "--lr", "1e400"], "--lr"), (["train", "--beta", "-1"], "--beta"),
        (["train", "--beta", "inf"], "--beta"), (["train", "--epochs", "-1"], "--epochs"),
        (["train", "--nll-k", "0"], "--nll-k"), (["train", "--n-train", "0"], "--n-train"),
        (["train", "--n-test", "-3"], "--n-test"), (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--seed", "-1"], "--seed"), (["train", "--seed", "x"], "--seed"),
        (["train", "--device", "tpu"], "tpu"), (["train", "--device", "cpu:1"], "cpu:1"),
        (["train", "--out", f], "is a file"), (["train", "--out", os.path.join(f, "sub")], "is a file"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["evaluate", "--model", str(root / "nope")], "no such folder"), (["evaluate", "--model", f], "not a folder"),
        (["evaluate", "--model", m, "--data", str(root / "nope.pt")], "nope.pt"),
        (["evaluate", "--model", m, "--K", "0"], "--K"), (["evaluate", "--model", m, "--batch-size-K", "0"], "--batch"),
        (["evaluate", "--model", m, "--batch-size", "-2"], "--batch-size"), (["evaluate", "--n-test", "0"], "--n-test"),
        (["evaluate", "--model", m, "--cond-mod", "image"], "--gen-mod"),
        (["evaluate", "--model", m, "--cond-mod", "image", "--gen-mod", "sound"], "'sound'"),
        (["evaluate", "--model", m, "--cond-mod", "img", "--gen-mod", "label"], "'img'"),
        (["evaluate", "--model", m, "--cond-mod", "image,", "--gen-mod", "label"], "--cond-mod"),
        (["evaluate", "--model", m, "--device", "gpu"], "gpu"),
        (["bench", "--ops", "nope"], "nope"), (["bench", "--providers", "eager,nope"], "nope"),
        (["bench", "--dtype", "int8"], "int8"), (["bench", "--json", str(root / "no" / "r.jsonl")], "create it"),
        (["bench", "--json", str(root)], "is a folder"),
        (["bench", "--plot", os.path.join(f, "p.png")], "not a folder"),
        (["bench", "--budget-s", "0"], "--budget-s"), (["bench", "--budget-s", "nan"], "--budget-s"),
        (["bench", "--smoke", "--quick"], "not allowed"), (["bench", "--device", "tpu"], "tpu"),
        (["kernels", "--M", "0"], "--M"), (["kernels", "--B", "-1"], "--B"), (["kernels", "--D", "x"], "--D"),
        (["kernels", "--dtype", "int8"], "int8"), (["info", "--bogus"], "--bogus"),
    ]


def test_every_bad_argument_is_one_line_and_exit_2_before_any_work(saved_model, capsys, monkeypatch):
    work = []
    for name in ("_train", "_score", "_run_bench"):
        monkeypatch.setattr(cli, name, lambda *a, **k: work.append(name) or 0)
    from crmvae_fast import kernel_report

    monkeypatch.setattr(kernel_report, "main", lambda *a, **k: work.append("kernels") or 0)
    for argv, words in _bad_cases(saved_model):
        line = _refused(capsys, argv)
        assert words in line, (argv, line)
    assert work == []  # nothing was trained, scored, benchmarked or compiled


def test_cuda_devices_that_are_not_there_are_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "CUDA is not available" in _refused(capsys, ["train", "--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = _refused(capsys, ["evaluate", "--device", "cuda:7"])
    assert "GPU 7" in line and "has 1" in line


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc as a place nobody can write in")
def test_unwritable_places_are_refused(capsys):
    assert "cannot be written" in _refused(capsys, ["train", "--out", "/proc/crmvae-fast-test/run"])
    assert "cannot be written" in _refused(capsys, ["bench", "--json", "/proc/crmvae-fast-test.jsonl"])


def test_bad_data_files_are_one_line(saved_model, capsys, tmp_path):
    m = str(saved_model / "model")
    (tmp_path / "cut.pt").write_bytes((saved_model / "data.pt").read_bytes()[:100])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"data": {"sound": torch.zeros(4, 3)}}, tmp_path / "other.pt")  # a modality the model lacks
    for name in ("cut.pt", "list.pt", "other.pt"):
        line = _refused(capsys, ["evaluate", "--model", m, "--data", str(tmp_path / name), "--K", "2", "--quiet"])
        assert name in line or "sound" in line, line


class _Pickled:
    def __reduce__(self):
        return (os.system, ("echo crmvae-fast-test-pwned",))


def test_data_files_load_without_running_code(saved_model, capfd, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"data": _Pickled()}, path)
    capfd.readouterr()
    try:
        code = cli.main(["evaluate", "--model", str(saved_model / "model"), "--data", str(path)])
    except Exception as exc:  # the old unpickling load ran the code, then failed on what it returned
        code = repr(exc)
    out, err = capfd.readouterr()
    assert "pwned" not in out and code == 2
    assert "evil.pt" in _error_line(err, "evaluate")


def test_a_real_bug_keeps_its_traceback_and_ctrl_c_is_one_line(capsys, monkeypatch, tmp_path):
    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_train", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "--out", str(tmp_path / "r"), "--device", "cpu"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--device", "cpu"]) == 130
    assert capsys.readouterr().err.splitlines() == ["crmvae-fast train: interrupted"]


# ---------------------------------------------------------------------------------- train and evaluate behaviour
def test_train_saves_before_the_nll_and_says_it_replaces_a_model(saved_model, tmp_path, capsys, monkeypatch):
    import crmvae_fast
    from crmvae_fast import CRMVAE

    out = tmp_path / "run"
    shutil.copytree(saved_model / "model", out)
    stamp = (out / "model.pt").stat().st_mtime_ns

    def failing_nll(*a, **k):
        raise ValueError("the held-out NLL failed")

    monkeypatch.setattr(crmvae_fast, "evaluate_joint_nll", failing_nll)
    assert cli.main(["train", "--epochs", "0", "--n-train", "8", "--n-test", "2", "--latent-dim", "3", "--out",
                     str(out), "--quiet", "--no-fast-kernels", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert f"{out} holds a saved model; this run's model will replace it" in captured.out
    assert _error_line(captured.err, "train").endswith("the held-out NLL failed")
    assert (out / "model.pt").stat().st_mtime_ns != stamp  # replaced, and kept although the NLL failed
    assert CRMVAE.load_from_folder(str(out)).model_config.latent_dim == 3


def test_evaluate_says_what_it_does_and_shows_progress(saved_model, capsys, monkeypatch):
    args = ["evaluate", "--model", str(saved_model / "model"), "--data", str(saved_model / "data.pt"), "--K", "2",
            "--batch-size-K", "2", "--batch-size", "2", "--device", "cpu"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[1] == f"loading the data from {saved_model / 'data.pt'}"
    assert lines[2] == f"loading the model from {saved_model / 'model'}"
    assert lines[3].startswith(f"scoring 6 points of --data {saved_model / 'data.pt'} with K=2 samples each")
    assert "joint NLL (K=2), batches" in captured.err  # a tqdm bar (tqdm is in the test extras' dependencies)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # without tqdm: a line per ~10 % on stderr
    assert cli.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(", NLL/point")[0] for ln in err] == [f"  joint NLL (K=2), batches: {i}/3" for i in (1, 2, 3)]
    assert all("NLL/point so far" in ln for ln in err)
    assert cli.main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_evaluate_uses_the_saved_fast_kernels_unless_told(tmp_path, capsys, monkeypatch):
    import crmvae_fast
    from crmvae_fast import CRMVAE, CRMVAEConfig, synthetic

    seen = []
    monkeypatch.setattr(crmvae_fast, "evaluate_joint_nll",
                        lambda model, *a, **k: seen.append(model.fast_kernels) or 0.0)
    for saved in (False, True):
        folder = str(tmp_path / f"m{saved}")
        CRMVAE(CRMVAEConfig(**synthetic.model_config_kwargs(latent_dim=2)), fast_kernels=saved).save(folder)
        for flag in ([], ["--fast-kernels"], ["--no-fast-kernels"]):
            assert cli.main(["evaluate", "--model", folder, "--n-test", "2", "--device", "cpu"] + flag) == 0
    assert seen == [False, True, False, True, True, False]


# ------------------------------------------------------------------------------------ help, version, laziness
NO_TORCH = r"""
import json, sys
from crmvae_fast import cli
seen = {}
for argv in json.loads(sys.argv[1]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
    seen[" ".join(argv)] = sorted(m for m in ("torch", "triton", "crmvae_fast.bench", "pythae") if m in sys.modules)
print(json.dumps(seen))
"""


def test_version_and_help_import_no_torch():
    argvs = [["--version"], ["--help"]] + [[c, "--help"] for c in ("info", "bench", "train", "evaluate", "kernels")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(argvs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen == {" ".join(a): [] for a in argvs}


def test_the_package_names_load_on_first_use():
    import crmvae_fast
    from crmvae_fast import model

    assert crmvae_fast.CRMVAE is model.CRMVAE and "CRMVAE" in dir(crmvae_fast)
    assert crmvae_fast.distributed.rank_range(4, 0, 2) == range(0, 2)  # a submodule, imported on demand
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        crmvae_fast.nothing_here


def test_top_level_help_lists_every_command_with_a_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("info", "doctor", "bench", "train", "evaluate", "kernels"):
        assert re.search(rf"^\s+{command}\s+\w", out, re.M), (command, out)


def test_bench_help_names_every_benchmarked_op_and_provider(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    ops = text.split("benchmarked ops: ", 1)[1].split(" (default", 1)[0]
    assert sorted(ops.split(", ")) == sorted(bench.OPS)
    assert tuple(cli.PROVIDER_HELP) == bench.PROVIDERS
    quick = text.split("--quick ", 2)[2].split(" --smoke")[0]  # its help line (the first mention is the usage)
    assert "under a minute" not in quick and "measured" in quick and "--budget-s" in quick  # it took 9.8 min


def test_doctor_is_wired_to_its_module(capsys, monkeypatch):
    doctor = pytest.importorskip("crmvae_fast.doctor", reason="crmvae_fast.doctor not merged yet")
    with pytest.raises(SystemExit) as e:
        cli.main(["doctor", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: crmvae-fast doctor")
    got = []
    monkeypatch.setattr(doctor, "run", lambda args: got.append(args) or 0)
    assert cli.main(["doctor"]) == 0
    assert len(got) == 1 and not hasattr(got[0], "rest")


@pytest.mark.parametrize("argv,command", [(["train", "--lr", "nan"], "train"),
                                          (["evaluate", "--model", "no-such-folder"], "evaluate"),
                                          (["bench", "--ops", "nope"], "bench")])
def test_python_dash_m_refuses_without_a_traceback(tmp_path, argv, command):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "crmvae_fast"] + argv, cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    _error_line(r.stderr, command)


# ---------------------------------------------------------------------------------------------------- the fuzz
_VALUES = ["0", "-1", "1", "2", "1.5", "0.5", "nan", "inf", "-inf", "1e400", "abc", "", ",", "cpu", "cuda", "cuda:7",
           "tpu", "float32", "int8", "image", "label", "image,label", "sound", "eager,fused", "latent_step",
           "4294967296", "NOPE", "FILE", "DIR", "MODEL"]


def _options():
    """Every subcommand and its option strings, read from the real parser (doctor's from its own module)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, sp in sub.choices.items():
        if name in cli.LAZY_COMMANDS:
            try:
                mod = importlib.import_module(f"crmvae_fast.{name}")
            except ImportError:
                continue
            sp = argparse.ArgumentParser()
            mod.add_arguments(sp)
        out[name] = sorted(s for a in sp._actions for s in a.option_strings if s not in ("-h", "--help"))
    return out


@st.composite
def _argv(draw, options):
    command = draw(st.sampled_from(sorted(options)))
    argv = [command]
    for _ in range(draw(st.integers(0, 4))):
        argv.append(draw(st.sampled_from(options[command] + ["--bogus"])))
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(_VALUES)))
    return argv


def test_fuzz_the_command_line(saved_model, monkeypatch):
    import crmvae_fast
    from crmvae_fast import kernel_report

    for name in ("_train", "_score", "_run_bench"):
        monkeypatch.setattr(cli, name, lambda *a, **k: 0)
    monkeypatch.setattr(kernel_report, "main", lambda *a, **k: 0)
    monkeypatch.setattr(crmvae_fast, "backend_info", lambda: {"triton": None})
    options = _options()
    if "doctor" in options:
        monkeypatch.setattr(importlib.import_module("crmvae_fast.doctor"), "run", lambda args: 0)
    paths = {"NOPE": str(saved_model / "nope"), "FILE": str(saved_model / "data.pt"), "DIR": str(saved_model),
             "MODEL": str(saved_model / "model")}

    @settings(max_examples=150, deadline=None)
    @given(_argv(options))
    def check(argv):
        argv = [paths.get(a, a) for a in argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code
        assert code in (0, 2), (argv, code, err.getvalue())
        if code == 2:
            _error_line(err.getvalue(), argv[0])

    check()
