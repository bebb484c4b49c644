"""The op registry (crmvae_fast/registry.py) carries every op, and everything that lists ops reads it: every
public op is registered, every entry's twin, custom ops, benchmark spec and compile configs exist, no
``crmvae_fast::`` custom op is left out, backend_info reports each op, and the extension loader and the op
modules do not import each other."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crmvae_fast import _extension, backend_info, bench, ops, registry

ROOT = Path(__file__).resolve().parent.parent
SPECS = list(registry.OPS.values())
IDS = [s.name for s in SPECS]


def test_every_public_op_is_registered_once():
    registered = [f for spec in SPECS for f in spec.functions]
    assert len(registered) == len(set(registered)), f"a function is claimed by two entries: {registered}"
    missing = sorted(set(ops.__all__) - set(registered))
    assert not missing, (f"crmvae_fast.ops exports {missing} but no entry of crmvae_fast/registry.py names them; "
                         "add them to their op's OpSpec.functions")
    stale = sorted(set(registered) - set(ops.__all__))
    assert not stale, f"the registry names {stale}, which crmvae_fast.ops.__all__ does not export"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_resolves(spec):
    mod = spec.load()
    assert mod.__name__ == f"crmvae_fast.kernels.{spec.name}"
    for fn in spec.functions:
        assert getattr(ops, fn) is getattr(mod, fn), f"ops.{fn} is not {spec.module}.{fn}"
    twin = spec.twin_function()
    assert callable(twin), spec.twin
    assert spec.bench in bench.SPECS, f"op {spec.name}: no BenchSpec {spec.bench!r} in crmvae_fast/bench/cases.py"
    assert spec.name in bench.SPECS[spec.bench].uses, f"BenchSpec {spec.bench!r} does not say it runs {spec.name}"


@pytest.mark.parametrize("spec", [s for s in SPECS if s.backend == "triton"], ids=lambda s: s.name)
def test_triton_ops_have_compile_configs(spec):
    configs = spec.load().compile_configs()
    assert configs, f"{spec.module}.compile_configs() is empty: tests/test_kernels_compile.py would build nothing"
    for name, kernel, signature, constexprs, options in configs:  # options: the launch's num_warps, maxnreg, ...
        assert isinstance(name, str) and isinstance(signature, dict) and isinstance(constexprs, dict)
        assert isinstance(options, dict) and options.get("num_warps") in (1, 2, 4, 8, 16, 32), options


def _extension_loaded() -> bool:
    return _extension.load() is not None


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_custom_ops_exist(spec):
    spec.load()
    if spec.backend == "extension" and not _extension_loaded():
        pytest.skip(f"the C++ extension is not loaded here ({_extension.status()[1]}): its ops are not defined")
    for name in spec.custom_ops:
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op), f"{spec.name}: custom op {name} is not defined"


def test_no_custom_op_left_out():
    for spec in SPECS:
        spec.load()
    if not _extension_loaded():
        pytest.skip(f"the C++ extension is not loaded here ({_extension.status()[1]}): cannot list all its ops")
    defined = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("crmvae_fast::")}
    registered = {n for spec in SPECS for n in spec.custom_ops}
    assert defined, "no crmvae_fast:: op is defined at all"
    assert defined <= registered, (f"custom ops with no registry entry: {sorted(defined - registered)}; add them "
                                   "to their op's OpSpec.custom_ops in crmvae_fast/registry.py")


def test_every_bench_spec_runs_registered_ops():
    for name, spec in bench.SPECS.items():
        assert spec.uses, name
        for op in spec.uses:
            assert op in registry.OPS, f"BenchSpec {name!r} runs {op!r}, which is not in the registry"
        assert set(spec.providers) <= set(bench.PROVIDERS) and "eager" in spec.providers and "fused" in spec.providers
    assert tuple(bench.SPECS) == bench.OPS


def test_backend_info_reports_every_op():
    info = backend_info()
    for spec in SPECS:
        for key in (spec.name,) + spec.aliases:
            assert set(info[key]) == {"cpu", "cuda"}, key
            assert info[key]["cpu"] in ("eager", "triton-interpreter", "extension")
            if info[key]["cpu"] == "eager":
                assert info["reasons"][f"{spec.name}.cpu"], f"{spec.name} runs eager on CPU but no reason is given"
    # Under the interpreter (tests without a GPU) the Triton ops run through it.
    if os.environ.get("TRITON_INTERPRET") == "1" and info["triton"]:
        assert info["latent_step"]["cpu"] == "triton-interpreter"
    assert info["joint_nll"] == info["iw_logsumexp"]


def test_register_rejects_duplicates_and_bad_backends():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.OPS["latent_step"])
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.OpSpec(name="x", functions=("x",), twin="m:x", custom_ops=(), backend="cuda", bench="x",
                        summary="")
    with pytest.raises(KeyError, match="registered:"):
        registry.get("no_such_op")
    assert registry.get("joint_nll") is registry.OPS["iw_logsumexp"]


def _imports(path: Path) -> set:
    """Modules a file imports at its top level or inside functions (relative imports resolved)."""
    pkg = "crmvae_fast" + "".join("." + p for p in path.relative_to(ROOT / "crmvae_fast").parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_import_cycle_between_the_loader_and_the_ops():
    ext = _imports(ROOT / "crmvae_fast" / "_extension.py")
    assert not {m for m in ext if m.startswith("crmvae_fast.kernels") or m.startswith("crmvae_fast.ops")}, ext
    assert "crmvae_fast._extension" in _imports(ROOT / "crmvae_fast" / "kernels" / "iw_logsumexp.py")
    reg = _imports(ROOT / "crmvae_fast" / "registry.py")
    assert not {m for m in reg if m.startswith("crmvae_fast")}, f"registry.py must stay a leaf module: {reg}"


FAKE_SCRIPT = r"""
import sys, torch
order = sys.argv[1]
from crmvae_fast import _extension
if order == "load-first":
    assert _extension.load() is not None, _extension.status()
import crmvae_fast.kernels.iw_logsumexp as iw
if order == "import-first":
    assert _extension.load() is not None, _extension.status()
assert "crmvae_fast.kernels.iw_logsumexp" in sys.modules
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    n, k, D = 3, 5, 4
    m, s = torch.ops.crmvae_fast.iw_lse_update(torch.empty(n, k), torch.empty(n, k, D), torch.empty(n, D),
                                               torch.empty(n, D), torch.empty(n), torch.empty(n))
print("FAKE", tuple(m.shape), tuple(s.shape))
"""


@pytest.mark.parametrize("order", ["load-first", "import-first"])
def test_fake_is_registered_whichever_comes_first(order):
    # The fake of the C++ op is registered through _extension.when_loaded: whether the library is loaded before
    # or after the op module is imported, torch.compile's fake tensors find it.
    if not _extension_loaded():
        pytest.skip(f"the C++ extension is not loaded here ({_extension.status()[1]})")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", FAKE_SCRIPT, order], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FAKE (3,) (3,)" in r.stdout
