"""Training throughput against the number of GPUs: ``torchrun --nproc_per_node=N -m crmvae_fast train`` for
N = 1, 2, 4, ... up to the GPUs present (weak scaling: the batch per GPU is fixed, the global batch is N times it).

    python benchmarks/bench_ddp.py [--procs 1,2,4,8] [--epochs 3] [--n-train 65536] [--batch-size 256]
                                   [--latent-dim 64] [--json PATH] [--budget-s S] [--device cuda|cpu]

Each N is one torchrun run of the package's own training command (DDP over NCCL, the fused kernels, the default
MLP model on the synthetic dataset of ``crmvae_fast.synthetic``). The command prints samples per second for each
epoch (all ranks' samples over the epoch's wall time); the first epoch carries the Triton compile and the
warm-up, so the figure is the median of the later epochs. Rows (one per N) are appended to
``benchmarks/results/ddp_scaling.jsonl`` (or ``--json``) and a markdown table is printed, with the scaling
efficiency ``samples/s at N / (N x samples/s at 1)``.

Without a GPU it measures nothing and says so (exit 0), unless ``--device cpu`` is given: then it runs gloo
processes on the CPU, which checks the plumbing (the numbers of a shared CPU mean little).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): loss/sample (\S+), (\d+) samples/s \(([\d.]+) s\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def run_one(n: int, args, timeout_s: float) -> dict:
    """One torchrun of the training command with ``n`` processes; the epochs' samples/s and wall times."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port",
               str(_free_port()), "-m", "crmvae_fast", "train", "--epochs", str(args.epochs), "--n-train",
               str(args.n_train), "--n-test", "64", "--nll-k", "10", "--batch-size", str(args.batch_size),
               "--latent-dim", str(args.latent_dim), "--device", args.device, "--quiet",
               "--out", os.path.join(tmp, "model")]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
    epochs = [EPOCH_LINE.match(line) for line in r.stdout.splitlines()]
    epochs = [m for m in epochs if m]
    if r.returncode != 0 or not epochs:
        tail = (r.stdout + r.stderr)[-2000:]
        raise RuntimeError(f"torchrun with {n} process(es) exited {r.returncode}:\n{tail}")
    sps = [int(m.group(4)) for m in epochs]
    timed = sps[1:] if len(sps) > 1 else sps
    return {"samples_per_s": statistics.median(timed), "epoch_samples_per_s": sps,
            "epoch_s": [float(m.group(5)) for m in epochs], "wall_s": round(wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default=None, help="comma-separated process counts (default 1, 2, 4, ... GPUs)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up (default 3)")
    p.add_argument("--n-train", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=256, help="batch per process (default 256)")
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", default=os.path.join(HERE, "results", "ddp_scaling.jsonl"))
    p.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ddp: no GPU here, nothing measured (use --device cpu for a plumbing check on gloo)")
        return 0
    n_dev = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    if args.procs:
        procs = [int(x) for x in args.procs.split(",")]
    else:
        procs = [n for n in (1, 2, 4, 8, 16) if n <= n_dev]
    if args.device == "cuda" and max(procs) > n_dev:
        print(f"bench_ddp: --procs asks for {max(procs)} processes, this machine has {n_dev} GPU(s); "
              "NCCL needs one GPU per process", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    base = {"run_id": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "source": "bench_ddp",
            "device": args.device, "device_name": name, "torch": torch.__version__, "git_commit": _git_commit(),
            "op": "train_ddp", "n_train": args.n_train, "batch_per_process": args.batch_size,
            "latent_dim": args.latent_dim, "epochs": args.epochs}
    print(f"bench_ddp: training throughput on {name}, {procs} process(es), batch {args.batch_size} per process, "
          f"{args.n_train} samples per epoch, latent {args.latent_dim}")
    t_start = time.perf_counter()
    rows = []
    for n in procs:
        row = dict(base, processes=n, global_batch=n * args.batch_size)
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)
        if left is not None and left <= 5:
            row.update(skipped=True, reason=f"no time left in --budget-s {args.budget_s}")
        else:
            try:
                row.update(run_one(n, args, timeout_s=max(10.0, left) if left is not None else 3600.0))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                row.update(skipped=True, reason=str(exc)[-500:])
        rows.append(row)
        print(f"  {n} process(es): " + (f"{row['samples_per_s']} samples/s (epochs: {row['epoch_samples_per_s']})"
                                        if not row.get("skipped") else f"skipped: {row['reason']}"), flush=True)
    one = next((r["samples_per_s"] for r in rows if r["processes"] == 1 and not r.get("skipped")), None)
    for r in rows:
        if one and not r.get("skipped"):
            r["scaling_efficiency"] = round(r["samples_per_s"] / (r["processes"] * one), 3)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "a", encoding="utf-8") as fp:
        for r in rows:
            fp.write(json.dumps(r) + "\n")
    print(f"\nMeasured on {name}, {base['date'][:10]}, torch {torch.__version__}: `torchrun --nproc_per_node=N -m "
          f"crmvae_fast train`, batch {args.batch_size} per process, median samples/s of epochs 2..{args.epochs}\n")
    print("| processes | global batch | samples/s | scaling efficiency |\n|---|---|---|---|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['processes']} | {r['global_batch']} | skipped | - |")
        else:
            eff = r.get("scaling_efficiency")
            print(f"| {r['processes']} | {r['global_batch']} | {r['samples_per_s']:.0f} | "
                  f"{'-' if eff is None else f'{eff:.2f}'} |")
    print(f"\n{len(rows)} rows appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
