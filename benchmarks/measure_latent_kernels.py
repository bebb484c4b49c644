"""Measure on a GPU the very launches that ``crmvae-fast kernels`` models, so the model is checked against the card.

    python benchmarks/measure_latent_kernels.py [--M 5 --B 4096 --D 512 --dtype float32] [--json PATH]

For each specialization of the kernel report (the latent step's forward, and its backward with the CRMVAE
loss's gradients, mask present, noise drawn in the kernel) it times the launcher alone with CUDA events
(median of 100 after 10 warm-ups, the L2 not flushed: at B = 4096 the 14 MiB of inputs fit in an H100's 50 MiB L2,
so the figure is a lower bound on a cold-cache time) and prints measured microseconds, achieved bytes/s by the
byte ledger, and the modelled issue and memory times beside them. Rows are appended to ``--json`` as JSON lines
(``"kind": "measured"``, with the report's fields under ``"model"``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--M", type=int, default=5)
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("measure_latent_kernels: no CUDA device here; run it on a GPU (benchmarks/run_gpu.sh does)",
              file=sys.stderr)
        return 2
    from crmvae_fast import kernel_report

    ls = importlib.import_module("crmvae_fast.kernels.latent_step")
    report = kernel_report.analyze(args.M, args.B, args.D, args.dtype)
    print(kernel_report.format_report(report, args.M, args.B, args.D, args.dtype) + "\n", flush=True)
    model = {r["name"].split("[")[0]: r for r in report}
    M, B, D = args.M, args.B, args.D
    dt = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    mu = torch.randn(M, B, D, device=dev, generator=g).to(dt)
    lv = (0.5 * torch.randn(M, B, D, device=dev, generator=g)).to(dt)
    mask = torch.rand(M, B, device=dev, generator=g) < 0.8
    seed = torch.randint(2**31 - 1, (1,), device=dev, dtype=torch.int64)
    g_zJ = torch.randn(B, D, device=dev, generator=g).to(dt)
    g_z = torch.randn(M, B, D, device=dev, generator=g).to(dt)
    g_kl0 = torch.randn(B, device=dev, generator=g)
    g_klm = torch.randn(M, B, device=dev, generator=g)
    calls = {
        "_latent_step_fwd_kernel": lambda: ls.latent_step_forward(mu, lv, mask, None, None, seed),
        "_latent_step_bwd_kernel": lambda: ls.latent_step_backward(mu, lv, mask, None, None, seed, None, None,
                                                                   g_zJ, g_z, g_kl0, g_klm),
    }
    name = torch.cuda.get_device_name(dev)
    rows = []
    for kernel, fn in calls.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(100):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        times.sort()
        us = times[len(times) // 2]
        m = model[kernel]
        gbs = m["bytes_per_element"] * m["elements"] / (us * 1e-6) / 1e9
        rows.append(dict(kind="measured", kernel=kernel, gpu=name, M=M, B=B, D=D, dtype=args.dtype, median_us=us,
                         p20_us=times[20], p80_us=times[80], achieved_GBps=gbs, time=time.time(), model=m))
        print(f"{kernel} on {name}: measured {us:.1f} us (p20 {times[20]:.1f}, p80 {times[80]:.1f}), "
              f"{gbs:.0f} GB/s by the ledger; modelled H100 issue {m['H100_issue_us']:.1f} us, "
              f"memory {m['H100_memory_us']:.1f} us, H200 memory {m['H200_memory_us']:.1f} us")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
