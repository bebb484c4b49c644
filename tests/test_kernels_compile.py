"""Every Triton kernel of ``crmvae_fast.ops.latent_step`` compiles to cubin for A100 (sm_80) and H100 (sm_90),
with no GPU present: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole
pipeline (TTIR -> TTGIR -> LLIR -> PTX -> ptxas, the ptxas triton ships).

Under ``TRITON_INTERPRET=1`` (set by conftest without a GPU) ``@triton.jit`` gives interpreter wrappers, not
``JITFunction``s, so the compilation runs in a subprocess with ``TRITON_INTERPRET=0``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: no kernels to compile")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r'''
    import importlib, json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module("crmvae_fast.ops.latent_step")
    kernels = {n: k for n, k in vars(mod).items() if isinstance(k, JITFunction) and n.endswith("_kernel")}

    CONSTEXPR = ("HAS_MASK", "DRAW", "CT", "BLOCK_M", "BLOCK_D")
    KL = ("kl0_ptr", "klm_ptr", "g_kl0_ptr", "g_klm_ptr")

    def signature(kernel, io):
        """Pointer types from the argument's role: mask bytes, int64 seed, KLs in float32, the rest in ``io``."""
        sig = {}
        for name in kernel.arg_names:
            if name in CONSTEXPR:
                sig[name] = "constexpr"
            elif name == "w_ptr":
                sig[name] = "*u8"
            elif name == "seed_ptr":
                sig[name] = "*i64"
            elif name in KL:
                sig[name] = "*fp32"
            elif name.endswith("_ptr"):
                sig[name] = io
            else:
                sig[name] = "i32"
        return sig

    # (input pointer type, constexprs): the model's float32 config with mask and drawn noise, and a bf16 one
    # with given noise and no mask, at the launchers' block shapes for M = 5, D = 512 and M = 16, D = 33.
    blocks = mod._blocks  # the launchers' own rule: (BLOCK_M, BLOCK_D, num_warps)
    CONFIGS = [
        ("*fp32", dict(HAS_MASK=True, DRAW=True, CT=tl.float32), blocks(5, 512)),
        ("*bf16", dict(HAS_MASK=False, DRAW=False, CT=tl.float32), blocks(16, 33)),
    ]
    results = []
    for cap in (80, 90):
        for kname, kernel in sorted(kernels.items()):
            for io, constexprs, (block_m, block_d, num_warps) in CONFIGS:
                constexprs = dict(constexprs, BLOCK_M=block_m, BLOCK_D=block_d)
                try:
                    compiled = triton.compile(
                        ASTSource(fn=kernel, signature=signature(kernel, io), constexprs=constexprs),
                        target=GPUTarget("cuda", cap, 32),
                        options={"num_warps": num_warps},
                    )
                    results.append(dict(kernel=kname, cap=cap, io=io, cubin=len(compiled.asm.get("cubin", b"")),
                                        error=None))
                except Exception as exc:  # reported by the test, with the kernel and target that failed
                    results.append(dict(kernel=kname, cap=cap, io=io, cubin=0, error=repr(exc)[:2000]))
    print("RESULTS " + json.dumps(dict(kernels=sorted(kernels), results=results)))
    '''
)


def test_every_kernel_compiles_to_cubin(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"compile script failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1][len("RESULTS "):])
    assert set(report["kernels"]) == {"_latent_step_fwd_kernel", "_latent_step_bwd_kernel"}, report["kernels"]
    bad = [r for r in report["results"] if r["error"] or r["cubin"] == 0]
    assert not bad, "kernels that did not compile to cubin:\n" + "\n".join(map(str, bad))
    assert {r["cap"] for r in report["results"]} == {80, 90}
