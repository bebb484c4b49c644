"""A static report on the Triton kernels of the latent step, needing no GPU (``crmvae-fast kernels``).

For every Triton specialization that one forward + backward of ``ops.latent_step`` launches at a shape
(:func:`crmvae_fast.kernels.latent_step.specializations`: the CRMVAE training step, so a mask, noise drawn in
the kernel, and the backward with the loss's gradients of z_J, z, KL_0 and KL_m), it compiles the kernel to
sm_90 cubin (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` in a subprocess with
``TRITON_INTERPRET=0``), and reads from it:

* registers per thread, stack, spill instructions (``STL``/``LDL`` in the SASS) and static shared memory
  (``cuobjdump -res-usage``);
* occupancy: resident warps per SM out of 64, from the registers (65536 per SM, allocated per warp in units of
  256), the shared memory (228 KiB per SM, 1 KiB reserved per block), and at most 32 blocks per SM;
* SASS warp-instructions per (b, d) element: every instruction of the kernel's main body (up to its ``EXIT``,
  ``nvdisasm``) counted once per warp, the instructions of a loop (a backward branch) weighted by its trip
  count, times the warps of a program and the programs of the grid, divided by B * D. Every forward branch is
  taken as not taken, so code that is skipped at run time still counts: the figure is an upper bound.

Model (a model, not a measurement; labelled "modelled" wherever it is quoted): issue time = warp-instructions
/ (SMs x 4 schedulers x boost clock), memory time = DRAM bytes (the kernel file's byte ledger,
:func:`~crmvae_fast.kernels.latent_step.bytes_per_element`) / bandwidth. H100 SXM: 132 SMs x 4 x 1.98 GHz =
1.05e12 warp-instructions/s, 3.0 TB/s (the SPEC's figures; the card's spec sheet says 3.35). H200: the same
SMs and clock, 4.8 TB/s. A kernel whose issue time is below its memory time is memory-bound by this model.
The report ends with the worst issue-time / memory-time ratio on the H100.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

GPUS = {
    "H100": dict(bandwidth=3.0e12, issue=132 * 4 * 1.98e9),
    "H200": dict(bandwidth=4.8e12, issue=132 * 4 * 1.98e9),
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SMEM_PER_SM = 65536, 64, 32, 228 * 1024

def compile_kernel(kernel, signature: dict, constexprs: dict, attrs: Optional[dict], cap: int, options: dict):
    """``triton.compile`` of one specialization to sm_``cap`` cubin, no GPU needed, with the installed triton's
    API: ``ASTSource(constexprs=, attrs={(i,): [["tt.divisibility", 16]]})`` from triton 3.3 on; before, the
    signature without the constexprs, ``constants=`` and an ``AttrsDescriptor`` of the 16-divisible arguments.
    ``signature`` names every argument (``"constexpr"`` for the constexprs), ``attrs`` as from 3.3 (or None)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    else:  # triton 3.1, 3.2
        from triton.compiler import AttrsDescriptor

        div = [i for (i,), hints in (attrs or {}).items() if ["tt.divisibility", 16] in hints]
        desc = (AttrsDescriptor.from_hints({i: 16 for i in div}) if hasattr(AttrsDescriptor, "from_hints")
                else AttrsDescriptor(tuple(div), ()))
        src = ASTSource(fn=kernel, signature={k: v for k, v in signature.items() if v != "constexpr"},
                        constants=dict(constexprs), attrs=desc)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)


_WORKER = r'''
import importlib, json, os, sys
from crmvae_fast.kernel_report import compile_kernel
ls = importlib.import_module("crmvae_fast.kernels.latent_step")
M, B, D, dtype, cap, out = json.loads(sys.argv[1])
rows = []
for i, s in enumerate(ls.specializations(M, B, D, dtype)):
    c = compile_kernel(s["kernel"], s["signature"], s["constexprs"], s["attrs"], cap, s["options"])
    path = os.path.join(out, f"k{i}.cubin")
    with open(path, "wb") as f:
        f.write(c.asm["cubin"])
    rows.append(dict(name=s["name"], cubin=path, num_warps=s["num_warps"], grid=s["grid"], block=s["block"],
                     elements=s["elements"], trips=s["trips"], bytes=s["bytes"], shared=c.metadata.shared))
print("ROWS " + json.dumps(rows))
'''


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"kernel report: expected {name} from triton's NVIDIA backend at {path}; "
                                "install a triton build that ships it (the pip wheels do)")
    return str(path)


def parse_sass(text: str) -> list:
    """``nvdisasm -c`` text -> a list of (label or None, instruction) in address order."""
    out, label = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((label, m.group(2)))
            label = None
    return out


def count_instructions(instrs: list, trips: int) -> dict:
    """Warp-instructions one warp issues: the main body (up to the first unpredicated EXIT), every loop (a
    backward branch to a label inside it) weighted by ``trips``. Returns ``dict(static, loops, issued)``."""
    labels = {lab: i for i, (lab, _) in enumerate(instrs) if lab}
    end = next((i for i, (_, t) in enumerate(instrs) if re.match(r"^EXIT\b", t)), len(instrs) - 1) + 1
    weight = [1] * end
    loops = []
    for i in range(end):
        m = re.search(r"\bBRA\s+`?\(?(\.L_x_\d+)", instrs[i][1])
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            start = labels[m.group(1)]
            loops.append((start, i))
            for j in range(start, i + 1):
                weight[j] *= trips
    return dict(static=end, loops=loops, issued=sum(weight))


def occupancy(regs: int, num_warps: int, shared: int) -> tuple[int, float]:
    """(blocks per SM, resident warps / 64)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM // (shared + 1024)
    blocks = max(0, min(MAX_BLOCKS_PER_SM, by_regs, by_smem, MAX_WARPS_PER_SM // num_warps))
    return blocks, blocks * num_warps / MAX_WARPS_PER_SM


def analyze(M: int = 5, B: int = 4096, D: int = 512, dtype: str = "float32", cap: int = 90) -> list:
    """One dict per specialization (see the module doc): name, registers, stack, spills, shared, occupancy,
    warp_instr_per_element, bytes_per_element and the modelled microseconds per GPU."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=os.path.join(tmp, "cache"))
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps([M, B, D, dtype, cap, tmp])], cwd=root,
                              env=env, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"kernel report: compiling the kernels for sm_{cap} failed (exit {proc.returncode}):"
                               f"\n{proc.stderr[-3000:]}")
        rows = json.loads(lines[-1][5:])
        for r in rows:
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", r["cubin"]], capture_output=True, text=True,
                                 check=True).stdout
            regs = int(re.search(r"REG:(\d+)", res).group(1))
            stack = int(re.search(r"STACK:(\d+)", res).group(1))
            sass = subprocess.run([_tool("nvdisasm"), "-c", r["cubin"]], capture_output=True, text=True,
                                  check=True).stdout
            instrs = parse_sass(sass)
            cnt = count_instructions(instrs, r["trips"])
            spills = sum(1 for _, t in instrs if re.match(r"^(@!?P\w+\s+)?(STL|LDL)\b", t))
            blocks, occ = occupancy(regs, r["num_warps"], r["shared"])
            total = cnt["issued"] * r["num_warps"] * r["grid"]
            r.update(registers=regs, stack=stack, spills=spills, blocks_per_sm=blocks, occupancy=occ,
                     sass_static=cnt["static"], loops=len(cnt["loops"]),
                     warp_instr_per_element=total / r["elements"], bytes_per_element=r.pop("bytes"))
            for gpu, spec in GPUS.items():
                r[f"{gpu}_issue_us"] = total / spec["issue"] * 1e6
                r[f"{gpu}_memory_us"] = r["bytes_per_element"] * r["elements"] / spec["bandwidth"] * 1e6
            del r["cubin"]
    return rows


def format_report(rows: list, M: int, B: int, D: int, dtype: str) -> str:
    out = [f"crmvae-fast kernels: latent step, M={M} B={B} D={D} {dtype}, sm_90 cubin, no GPU used",
           "modelled: issue = warp-instr / 1.05e12 per s (132 SMs x 4 x 1.98 GHz, H100 and H200); "
           "memory = ledger bytes / 3.0 TB/s (H100), 4.8 TB/s (H200)", ""]
    for r in rows:
        out.append(r["name"])
        out.append(f"  grid {r['grid']} x {r['num_warps']} warps, tile {r['block'][0]}x{r['block'][1]}, "
                   f"D-loop trips {r['trips']}; registers {r['registers']}, spill instructions {r['spills']}, "
                   f"stack {r['stack']} B, shared {r['shared']} B, occupancy {r['blocks_per_sm']} blocks = "
                   f"{100 * r['occupancy']:.0f}% of 64 warps")
        out.append(f"  SASS {r['sass_static']} instructions in the main body, {r['loops']} loop(s); "
                   f"{r['warp_instr_per_element']:.1f} warp-instructions per element against "
                   f"{r['bytes_per_element']} bytes per element")
        for gpu in GPUS:
            i, m = r[f"{gpu}_issue_us"], r[f"{gpu}_memory_us"]
            out.append(f"  {gpu} (modelled): issue {i:.3g} us, memory {m:.3g} us, ratio {i / m:.2f} "
                       f"({'memory' if i <= m else 'issue'}-bound)")
    worst = max(rows, key=lambda r: r["H100_issue_us"] / r["H100_memory_us"])
    out.append("")
    out.append(f"worst issue/memory ratio on the H100 (modelled): "
               f"{worst['H100_issue_us'] / worst['H100_memory_us']:.2f} ({worst['name'].split('[')[0]})")
    return "\n".join(out)


def main(M: int = 5, B: int = 4096, D: int = 512, dtype: str = "float32", as_json: bool = False,
         file=None) -> int:
    rows = analyze(M, B, D, dtype)
    print(json.dumps(rows, indent=2) if as_json else format_report(rows, M, B, D, dtype), file=file or sys.stdout)
    return 0
