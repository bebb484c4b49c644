"""Every Triton kernel of ``crmvae_fast.kernels`` compiles to cubin for A100 (sm_80) and H100 (sm_90), with no GPU
present. The ops come from the registry (:mod:`crmvae_fast.registry`, every op whose backend is ``"triton"``);
each op's module lists the specializations to build in ``compile_configs()``; a kernel module under
``crmvae_fast/kernels`` with Triton kernels but no registry entry fails the test.
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole pipeline (TTIR -> TTGIR ->
LLIR -> PTX -> ptxas, the ptxas triton ships); :func:`crmvae_fast.kernel_report.compile_kernel` calls it with the
API of the installed triton (it changed in 3.3).

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
    import importlib, json, pkgutil
    from triton.runtime.jit import JITFunction
    import crmvae_fast.kernels as pkg
    from crmvae_fast import registry
    from crmvae_fast.kernel_report import compile_kernel  # the installed triton's compile API

    # Every Triton op of the registry declares the specializations to build in compile_configs():
    # (name, kernel, signature, constexprs, the launch's compile options: num_warps, ...). Every module holding Triton
    # kernels must be such an op.
    triton_ops = [spec for spec in registry.OPS.values() if spec.backend == "triton"]
    kernels, configs, unregistered = [], [], []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        jitted = [n for n, k in vars(mod).items() if isinstance(k, JITFunction) and n.endswith("_kernel")]
        kernels += [f"{info.name}.{n}" for n in jitted]
        if jitted and mod.__name__ not in {spec.module for spec in triton_ops}:
            unregistered.append(mod.__name__)
    for spec in triton_ops:
        configs += [(spec.name, c) for c in spec.load().compile_configs()]
    results = []
    for cap in (80, 90):
        for modname, (name, kernel, signature, constexprs, options) in configs:
            try:
                compiled = compile_kernel(kernel, signature, constexprs, None, cap, options)
                results.append(dict(kernel=f"{modname}.{kernel.__name__}", config=name, cap=cap,
                                    cubin=len(compiled.asm.get("cubin", b"")), error=None))
            except Exception as exc:  # reported by the test, with the kernel and target that failed
                results.append(dict(kernel=f"{modname}.{kernel.__name__}", config=name, cap=cap, cubin=0,
                                    error=repr(exc)[:2000]))
    print("RESULTS " + json.dumps(dict(kernels=sorted(kernels), results=results, unregistered=unregistered)))
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
    assert {"latent_step._latent_step_fwd_kernel", "latent_step._latent_step_bwd_kernel"} <= set(report["kernels"])
    assert not report["unregistered"], (
        f"kernel modules with Triton kernels but no entry in crmvae_fast/registry.py: {report['unregistered']}; "
        "register them (OpSpec with backend='triton') so their compile_configs() are built")
    built = {r["kernel"] for r in report["results"]}
    assert built == set(report["kernels"]), f"kernels with no compile_configs() entry: {set(report['kernels']) - built}"
    bad = [r for r in report["results"] if r["error"] or r["cubin"] == 0]
    assert not bad, "kernels that did not compile to cubin:\n" + "\n".join(map(str, bad))
    assert {r["cap"] for r in report["results"]} == {80, 90}
