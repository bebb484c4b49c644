"""Print the benchmark table (markdown) of the latest GPU run in ``benchmarks/results/results.jsonl``.

    python benchmarks/make_table.py [results.jsonl] [--cpu]

Takes the latest run measured on a GPU (a run = the rows of one ``crmvae-fast bench`` or one pytest session)
and prints a table naming the card and the date, then the SPEC's performance targets, measured against their
thresholds. With no GPU rows it prints a line saying the package has not been measured on a GPU yet; ``--cpu``
adds the latest CPU run the same way.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crmvae_fast import bench  # noqa: E402

PROVIDER_COLS = ("multivae", "eager", "fused", "compile")


def latest_run(rows, device: str):
    """The rows of the latest run on ``device`` (by date), preferring runs of the CLI over pytest's."""
    runs = {}
    for r in rows:
        if r.get("device") == device:
            runs.setdefault(r["run_id"], []).append(r)
    if not runs:
        return []
    best = max(runs.values(), key=lambda rs: (rs[0].get("date") or "", rs[0].get("source") == "cli", len(rs)))
    return bench.attach_speedups([dict(r) for r in best])


def _ms(r):
    if r is None or r.get("skipped") or r.get("median_ms") is None:
        return "-"
    return f"{r['median_ms']:.3g}"


def _figures(fused, eager, ok) -> str:
    """The row group's device-independent figures: launches eager / fused and modelled MB of a train step, or
    the fused latent kernel's modelled figures (``crmvae_fast.bench.figures_cell``)."""
    if not ok(fused):
        return "-"
    if ok(eager) and fused.get("launches") is not None and eager.get("launches") is not None:
        at = f" at B={fused['counts_B']}" if fused.get("counts_B") not in (None, fused["B"]) else ""
        return (f"launches {eager['launches']} / {fused['launches']}, MB {eager['bytes_modelled'] / 1e6:.3g} / "
                f"{fused['bytes_modelled'] / 1e6:.3g} modelled{at} (eager / fused)")
    return bench.figures_cell(fused)


def table(rows) -> str:
    r0 = rows[0]
    commit = (r0.get("git_commit") or "unknown")[:10] + (" (dirty)" if r0.get("git_dirty") else "")
    head = (f"Measured on **{r0['device_name']}**, {(r0.get('date') or '')[:10]}: torch {r0.get('torch')}, "
            f"triton {r0.get('triton')}, crmvae_fast {r0.get('package_version')}, commit {commit}. "
            "Median ms per call (20/80 % quantiles in `benchmarks/results/results.jsonl`), float32; speed-up = "
            "baseline median / fused median (baseline: MultiVae for the joint NLL when installed, else eager).")
    cols = ["op / mode", "M", "B", "D"] + [f"{p} ms" for p in PROVIDER_COLS] + \
        ["fused speed-up", "fused vs compile", "fused % copy BW", "peak MB eager / fused", "fused runs"]
    with_figures = any(bench.figures_cell(r) != "-" for r in rows if not r.get("skipped"))
    if with_figures:  # device-independent: counted launches / modelled bytes, modelled kernel figures
        cols.append("counted / modelled")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["M"], r["B"], r["D"]), {})[r["provider"]] = r
    order = {op: i for i, op in enumerate(bench.SPECS)}
    modes = {m: i for spec in bench.SPECS.values() for i, m in enumerate(spec.modes)}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), modes.get(k[1], 9), k[2], k[4], k[3])):
        g = groups[key]
        if all(r.get("skipped") for r in g.values()):
            continue
        fused, comp, eager = g.get("fused"), g.get("compile"), g.get("eager")
        ok = lambda r: r is not None and not r.get("skipped") and r.get("median_ms")  # noqa: E731
        sp = f"{fused['speedup']:.2f}x vs {fused['baseline']}" if ok(fused) and fused.get("speedup") else "-"
        vs_c = f"{comp['median_ms'] / fused['median_ms']:.2f}x" if ok(fused) and ok(comp) else "-"
        bw = f"{100 * fused['bw_fraction']:.0f}%" if ok(fused) and fused.get("bw_fraction") is not None else "-"
        pm = "-"
        if ok(fused) and ok(eager) and fused.get("peak_mem_mb") is not None and eager.get("peak_mem_mb") is not None:
            pm = f"{eager['peak_mem_mb']:.0f} / {fused['peak_mem_mb']:.0f}"
        n = (g.get("fused") or next(iter(g.values()))).get("params") or {}
        op = f"{key[0]} / {key[1]}" + (f" (n={n['n']}, K={n['K']})" if "K" in n else "")
        backend = (fused or {}).get("backend") or "-"
        cells = [op, str(key[2]), str(key[3]), str(key[4])] + [_ms(g.get(p)) for p in PROVIDER_COLS]
        extra = [_figures(fused, eager, ok)] if with_figures else []
        lines.append("| " + " | ".join(cells + [sp, vs_c, bw, pm, backend] + extra) + " |")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += [""] + [f"Note: {n}." for n in notes]
    return "\n".join(lines)


def _find(rows, op, mode, provider, M=None, B=None, D=None, n=None):
    for r in rows:
        if (r["op"], r["mode"], r["provider"]) != (op, mode, provider) or r.get("skipped"):
            continue
        if M is not None and (r["M"], r["B"], r["D"]) != (M, B, D):
            continue
        if n is not None and (r.get("params") or {}).get("n") != n:
            continue
        return r
    return None


def targets(rows, device: str) -> str:
    """The SPEC's section-5 targets, measured against their thresholds (only those this device measures)."""
    out = []

    def check(label, value, threshold, fmt="{:.2f}x"):
        if value is None:
            out.append(f"- {label}: not measured in this run")
        else:
            verdict = "met" if value >= threshold else "NOT met"
            out.append(f"- {label}: {fmt.format(value)} (target {fmt.format(threshold)}): {verdict}")

    def ratio(a, b):
        return None if a is None or b is None else a["median_ms"] / b["median_ms"]

    M, B, D = bench.TARGET
    if device == "cuda":
        full = {p: _find(rows, "latent_step", "full", p, M, B, D) for p in ("eager", "fused", "compile")}
        check(f"latent step fwd+bwd, M={M} B={B} D={D}, fused vs eager", ratio(full["eager"], full["fused"]), 5.0)
        check(f"latent step fwd+bwd, M={M} B={B} D={D}, fused vs torch.compile",
              ratio(full["compile"], full["fused"]), 1.5)
        for mode in ("fwd", "bwd"):
            r = _find(rows, "latent_step", mode, "fused", M, B, D)
            check(f"latent step {mode}, M={M} B={B} D={D}, fused bytes / time vs measured copy bandwidth",
                  None if r is None or r.get("bw_fraction") is None else r["bw_fraction"], 0.70, "{:.0%}")
        tr = {p: _find(rows, "train_step", "step", p, M, B, D) for p in ("eager", "fused")}
        check(f"train step (default MLP), M={M} B={B} D={D}, fused vs eager", ratio(tr["eager"], tr["fused"]), 1.3)
        nll = {p: _find(rows, "joint_nll", "eval", p, n=1000) for p in ("multivae", "fused")}
        check("compute_joint_nll n=1000 K=1000, fused vs MultiVae", ratio(nll["multivae"], nll["fused"]), 100.0)
        worse = []
        for r in rows:
            if r["provider"] == "fused" and not r.get("skipped") and r.get("peak_mem_mb") is not None:
                e = _find(rows, r["op"], r["mode"], "eager", r["M"], r["B"], r["D"])
                if e is not None and e.get("peak_mem_mb") is not None and r["peak_mem_mb"] > e["peak_mem_mb"]:
                    worse.append(f"{r['op']}/{r['mode']} M={r['M']} B={r['B']} D={r['D']}")
        out.append("- peak memory of the fused path never above the eager path's: " +
                   ("met" if not worse else "NOT met at " + ", ".join(worse)))
    else:
        nll = {p: _find(rows, "joint_nll", "eval", p, n=64) for p in ("multivae", "fused")}
        check("compute_joint_nll n=64 K=1000 on CPU, fused vs MultiVae", ratio(nll["multivae"], nll["fused"]), 3.0)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default=os.path.join(HERE, "results", "results.jsonl"))
    p.add_argument("--cpu", action="store_true", help="also print the latest CPU run")
    args = p.parse_args(argv)
    rows = bench.read_rows(args.path)
    gpu = latest_run(rows, "cuda")
    if gpu:
        print(table(gpu))
        print("\nSPEC targets (section 5):\n")
        print(targets(gpu, "cuda"))
    else:
        print("crmvae_fast has not been measured on a GPU yet: no GPU rows in "
              f"{os.path.relpath(args.path)}. Run `bash benchmarks/run_gpu.sh` on a machine with one.")
    if args.cpu:
        cpu = latest_run(rows, "cpu")
        if cpu:
            print("\n" + table(cpu))
            print("\nSPEC targets (section 5, CPU):\n")
            print(targets(cpu, "cpu"))
        else:
            print("\nNo CPU rows either.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
