"""The rows of a benchmark run: one JSON dict per (case, provider) (:data:`ROW_KEYS`, :func:`make_row`), the
speed-ups against each op's baseline (:func:`attach_speedups`), the JSON-lines file they are appended to, the
plain-text table and the PNG plot."""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

import torch

from .cases import PROVIDERS, SPECS, Case
from .environment import default_results_path
from .timing import copy_bandwidth_gbps

#: The fields of every row, in order (``docs/benchmarks.md`` lists them).
ROW_KEYS = (
    "run_id", "date", "source", "device", "device_name", "torch", "triton", "cuda", "package_version",
    "git_commit", "git_dirty", "interpreter",
    "op", "mode", "provider", "backend", "dtype", "M", "B", "D", "params",
    "median_ms", "q20_ms", "q80_ms", "reps", "timer",
    "peak_mem_mb", "bytes", "bytes_formula", "gbps", "copy_gbps", "bw_fraction",
    "baseline", "speedup", "skipped", "note",
) + (
    # device-independent figures (BenchSpec.figures), None where the op has none: a train step's counted
    # launches and modelled bytes per forward + backward (crmvae_fast.counts), the fused latent step's modelled
    # kernel figures (crmvae_fast.kernel_report; ``modelled`` is True), or why they are missing
    "launches", "aten_launches", "triton_launches", "bytes_modelled", "counts_B",
    "modelled", "modelled_kernels", "warp_instr_per_element", "bytes_per_element", "registers", "spills",
    "occupancy", "H100_issue_us", "H100_memory_us", "H200_issue_us", "H200_memory_us", "figures_reason",
)
#: The device-independent fields of :data:`ROW_KEYS`.
FIGURE_KEYS = ROW_KEYS[ROW_KEYS.index("launches"):]

#: Said in a row (and the table) instead of a speed-up when it ran the same backend as its baseline.
SAME_BACKEND = "ran the same backend as the baseline {base} ({backend}) here: no speed-up reported"


def backend_of(case: Case, provider: str, device: torch.device) -> str:
    """What actually runs ``provider`` here: for ``fused``, what runs the registered ops the case's spec uses
    (:func:`crmvae_fast._backend.op_backend`; a fused op on a CPU without the interpreter runs its eager twin,
    so this says ``eager``); one name when they agree, else ``op=runner`` pairs."""
    if provider == "eager":
        return "eager"
    if provider == "compile":
        return "inductor"
    if provider == "multivae":
        return "multivae"
    try:
        from .. import registry
        from .._backend import op_backend

        runners = {op: op_backend(registry.get(op), device.type)[0] for op in SPECS[case.op].uses}
    except Exception:
        return "unknown"
    if len(set(runners.values())) == 1:
        return str(next(iter(runners.values())))
    return ",".join(f"{op}={r}" for op, r in runners.items())


def make_row(env: dict, case: Case, provider: str, device: torch.device, *, stats: Optional[dict] = None,
             timer: Optional[str] = None, peak_mem_mb: Optional[float] = None, skipped: Optional[str] = None,
             note: Optional[str] = None) -> dict:
    """One JSON row (keys :data:`ROW_KEYS`)."""
    stats = stats or {}
    spec = SPECS[case.op]
    row = {k: None for k in ROW_KEYS}
    row.update(env)
    row.update(op=case.op, mode=case.mode, provider=provider, dtype=case.dtype, M=case.M, B=case.B, D=case.D,
               params=dict(case.params), timer=timer, peak_mem_mb=peak_mem_mb, skipped=skipped, note=note,
               backend=None if skipped else backend_of(case, provider, device))
    row.update({k: stats.get(k) for k in ("median_ms", "q20_ms", "q80_ms", "reps")})
    row["bytes_formula"] = spec.bytes_formula.get(case.mode)
    if spec.nbytes is not None:
        nbytes = spec.nbytes(case)
        row["bytes"] = nbytes
        if row["median_ms"]:
            row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
            if device.type == "cuda":
                row["copy_gbps"] = copy_bandwidth_gbps(device)
                row["bw_fraction"] = row["gbps"] / row["copy_gbps"]
    if env.get("interpreter") and provider == "fused" and device.type == "cpu":
        row["note"] = ((row["note"] + "; ") if row["note"] else "") + \
            "TRITON_INTERPRET=1: fused kernels ran in the Triton interpreter, the time means nothing"
    return row


def _add_note(r: dict, msg: str) -> None:
    if msg not in (r.get("note") or ""):
        r["note"] = ((r["note"] + "; ") if r.get("note") else "") + msg


def attach_speedups(rows: List[dict]) -> List[dict]:
    """Set ``baseline`` and ``speedup`` (baseline median / row median) on the rows of one run: the baseline is
    the first of the spec's ``baselines`` that ran (``multivae`` for joint_nll when it ran, the SPEC's peer;
    else ``eager``). A row that ran the same backend as its baseline (the fused provider on a CPU where the op
    falls back to its eager twin) gets no speed-up, and a note saying so; the baseline's own is 1."""
    groups = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for rs in groups.values():
        by = {r["provider"]: r for r in rs if r.get("median_ms")}
        spec = SPECS.get(rs[0]["op"])
        prefs = spec.baselines if spec is not None else ("eager",)
        base = next((p for p in prefs if p in by), prefs[-1])
        for r in rs:
            r["baseline"] = base if base in by else None
            r["speedup"] = None
            if base not in by or not r.get("median_ms"):
                continue
            if r is not by[base] and r.get("backend") == by[base].get("backend"):
                _add_note(r, f"{r['provider']} " + SAME_BACKEND.format(base=base, backend=r.get("backend")))
                continue
            r["speedup"] = by[base]["median_ms"] / r["median_ms"]
            if base != prefs[0] and r["provider"] != base:
                _add_note(r, f"{prefs[0]} did not run here (see its row): the {r['op']} baseline is {base}")
    return rows


def _group_key(r: dict) -> tuple:
    return (r.get("run_id"), r["op"], r["mode"], r["dtype"], r["M"], r["B"], r["D"],
            json.dumps(r.get("params") or {}, sort_keys=True))


def append_rows(rows: Iterable[dict], path: Optional[str] = None) -> str:
    """Append rows as JSON lines to ``path`` (default :func:`default_results_path`); returns the path."""
    path = path or default_results_path()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fp:
        for r in rows:
            fp.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def read_rows(path: str) -> List[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


# ----------------------------------------------------------------------------------------------- table / plot
def _fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def _speedup_cell(r: dict) -> str:
    if r.get("speedup") is not None and r["provider"] == r.get("baseline"):
        return "baseline"
    if r.get("speedup") is not None:
        return f"{r['speedup']:.2f}x vs {r['baseline']}"
    if r.get("baseline") and r["provider"] != r["baseline"] and r.get("median_ms"):
        return f"- (same backend as {r['baseline']})"
    return "-"


def figures_cell(r: dict) -> str:
    """The device-independent figures of a row in a few words (``-`` when it has none): counted launches and
    modelled MB per forward + backward (and the B they were counted at when not the row's), or the modelled
    warp-instructions per element and H100 issue / memory microseconds."""
    if r.get("launches") is not None:
        at = f" at B={r['counts_B']}" if r.get("counts_B") not in (None, r.get("B")) else ""
        return (f"{r['launches']} launches ({r.get('triton_launches') or 0} triton), "
                f"{r['bytes_modelled'] / 1e6:.3g} MB modelled{at}")
    if r.get("warp_instr_per_element") is not None:
        return (f"{r['warp_instr_per_element']:.1f} warp-instr/el, H100 issue/mem "
                f"{r['H100_issue_us']:.3g}/{r['H100_memory_us']:.3g} us (modelled)")
    return "-"


def format_table(rows: List[dict]) -> str:
    """A plain-text table: one line per (case, provider), times in ms with the 20-80 % range, the speed-up
    over the baseline, peak memory and, for the latent step, GB/s and the fraction of the copy bandwidth; a
    last column of device-independent figures (:func:`figures_cell`) when some row has them."""
    head = ["op", "mode", "M", "B", "D", "provider", "backend", "median ms", "q20-q80 ms", "speed-up",
            "peak MB", "GB/s", "% copy BW"]
    with_figures = any(figures_cell(r) != "-" for r in rows if not r.get("skipped"))
    if with_figures:
        head.append("counted / modelled (device-independent)")
    lines = [head]
    order = {p: i for i, p in enumerate(PROVIDERS)}
    ops = list(SPECS)
    skipped = []
    for r in sorted(rows, key=lambda r: (ops.index(r["op"]) if r["op"] in ops else 9, r["mode"], r["M"], r["D"],
                                         r["B"], order.get(r["provider"], 9))):
        if r.get("skipped"):
            skipped.append(f"  {r['op']}/{r['mode']} M={r['M']} B={r['B']} D={r['D']} [{r['provider']}]: "
                           f"{r['skipped']}")
            continue
        lines.append([r["op"], r["mode"], str(r["M"]), str(r["B"]), str(r["D"]), r["provider"], r.get("backend") or "-",
                      _fmt(r["median_ms"], ".4g"), f"{_fmt(r['q20_ms'], '.4g')}-{_fmt(r['q80_ms'], '.4g')}",
                      _speedup_cell(r), _fmt(r.get("peak_mem_mb"), ".1f"),
                      _fmt(r.get("gbps"), ".1f"),
                      "-" if r.get("bw_fraction") is None else f"{100 * r['bw_fraction']:.0f}%"]
                     + ([figures_cell(r)] if with_figures else []))
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = sorted({r["note"] for r in rows if r.get("note")} |
                   {f"{r['op']} [{r['provider']}]: no figures: {r['figures_reason']}" for r in rows
                    if r.get("figures_reason") and not r.get("skipped")})
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    if skipped:
        out += ["", "skipped:"] + skipped
    return "\n".join(out)


def plot(rows: List[dict], path: str) -> Optional[str]:
    """A PNG of speed-up against size (M*B*D), one panel per op/mode, one line per provider and (M, D). Returns
    None when written, else the reason (matplotlib missing, nothing measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except Exception as exc:
        return f"matplotlib is not available ({exc.__class__.__name__}): no plot written"
    rows = [r for r in rows if r.get("speedup") is not None and r["provider"] != r.get("baseline")]
    if not rows:
        return "no speed-up to plot (no provider ran beside its baseline)"
    ops = list(SPECS)
    modes = {m: i for spec in SPECS.values() for i, m in enumerate(spec.modes)}
    panels = sorted({(r["op"], r["mode"]) for r in rows},
                    key=lambda p: (ops.index(p[0]) if p[0] in ops else 9, modes.get(p[1], 9)))
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    colors = {"fused": "tab:blue", "compile": "tab:orange", "eager": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for ax, (op, mode) in zip(axes.flat, panels):
        rs = [r for r in rows if (r["op"], r["mode"]) == (op, mode)]
        md = sorted({(r["M"], r["D"]) for r in rs})
        by_n = op in SPECS and SPECS[op].x_axis == "n"
        x_of = (lambda r: r["B"]) if by_n else (lambda r: r["M"] * r["B"] * r["D"])
        for prov, M, D in sorted({(r["provider"], r["M"], r["D"]) for r in rs}):
            pts = sorted((x_of(r), r["speedup"]) for r in rs if (r["provider"], r["M"], r["D"]) == (prov, M, D))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors.get(prov),
                    ls=styles[md.index((M, D)) % len(styles)], label=f"{prov} M={M} D={D}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("n (data points)" if by_n else "M*B*D")
        ax.set_ylabel(f"speed-up vs {rs[0]['baseline']}")
        ax.set_title(f"{op} / {mode}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    r0 = rows[0]
    fig.suptitle(f"crmvae_fast {r0.get('package_version')} on {r0.get('device_name')}, {r0.get('date', '')[:10]}",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
