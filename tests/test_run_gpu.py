"""``benchmarks/run_gpu.sh`` returns what the GPU slot can bring back: at most 8 files of at most 16 MiB, no
folders, names of letters, digits, '.', '_' and '-', every step's log inside ``logs.tar.gz``, also when its time
budget runs out. Run here in its dry mode (``CRMVAE_GPU_DRY_RUN=1``: every step a tiny CPU version)."""

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")
STEPS = {"env": "env.txt", "build": "build.log", "doctor": "doctor.log", "pytest": "pytest.log",
         "kernels": "kernels.txt", "ddp": "bench_ddp.log", "bench": "bench.log", "table": "table.md"}
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def test_script_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _run(out, budget=None):
    env = dict(os.environ, OUT=str(out), CRMVAE_GPU_DRY_RUN="1", PYTHON=sys.executable)
    if budget is not None:
        env["CRMVAE_GPU_BUDGET_S"] = str(budget)
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _returned(out) -> dict:
    """The files the slot would bring back, checked against its limits: name -> path."""
    entries = sorted(os.listdir(out))
    assert len(entries) <= 8, entries
    for name in entries:
        path = os.path.join(out, name)
        assert os.path.isfile(path) and not os.path.islink(path), f"{name} is not a plain file"
        assert NAME.match(name), name
        assert os.path.getsize(path) <= 16 * 2**20, name
    with tarfile.open(os.path.join(out, "logs.tar.gz")) as tar:
        logs = {os.path.basename(m.name) for m in tar.getmembers() if m.isfile()}
    assert set(STEPS.values()) <= logs, sorted(logs)
    return {name: os.path.join(out, name) for name in entries}


def _step_rows(summary: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| (\S+) \|", summary, re.M)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the script; on a GPU "
                    "machine the script itself runs (and runs these tests)")
def test_dry_run_returns_at_most_8_files_with_every_step_log(tmp_path):
    _run(tmp_path)
    files = _returned(tmp_path)
    assert {"summary.md", "logs.tar.gz", "doctor.json", "results.jsonl"} <= set(files)
    assert not [f for f in files if f.endswith((".tmp", ".partial"))]
    with open(files["summary.md"]) as fp:
        rows = _step_rows(fp.read())
    assert set(rows) == set(STEPS)
    assert rows["doctor"] == "0" and rows["pytest"] == "0" and rows["bench"] == "0"
    assert rows["kernels"] == "2"  # no GPU: the step fails, and the script goes on
    with open(files["doctor.json"]) as fp:
        assert json.load(fp)["passed"] is True
    with open(files["results.jsonl"]) as fp:
        assert [json.loads(line) for line in fp if line.strip()]


def test_a_spent_budget_skips_the_steps_and_still_returns_the_summary_and_logs(tmp_path):
    _run(tmp_path, budget=1)
    files = _returned(tmp_path)
    assert set(files) == {"summary.md", "logs.tar.gz"}
    with open(files["summary.md"]) as fp:
        rows = _step_rows(fp.read())
    assert {rows[s] for s in STEPS} == {"skipped"}
