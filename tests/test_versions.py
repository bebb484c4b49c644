"""The declared torch / Triton range (:mod:`crmvae_fast.versions`): one lower bound, the same in pyproject.toml and
setup.py, every tested run recorded, ``backend_info()`` placing the installed versions in the range and warning
once outside it, and the interpreter fix that the older tritons of the range need."""

import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from crmvae_fast import _backend, backend_info, versions

from conftest import needs_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_one_lower_bound_everywhere():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={versions.MIN_TORCH}"' in pyproject, "pyproject.toml's torch bound is not versions.MIN_TORCH"
    assert f"triton>={versions.MIN_TRITON}" in pyproject, "pyproject.toml's triton bound is not versions.MIN_TRITON"
    assert not re.search(r'"torch[^"]*<', pyproject), "no upper pin on torch: the range's top is the newest tested"
    setup = (ROOT / "setup.py").read_text()
    assert "versions.py" in setup and "MIN_TORCH" in setup and "Version(" in setup


def test_tested_table_spans_the_range():
    assert versions.TESTED, "no tested run recorded"
    lows = [r for r in versions.TESTED if versions.release(r.torch)[:2] == versions.release(versions.MIN_TORCH)[:2]]
    assert lows, f"the lower bound torch {versions.MIN_TORCH} has no tested run"
    assert all(versions.release(r.triton) >= versions.release(versions.MIN_TRITON) for r in versions.TESTED)
    for r in versions.TESTED:
        assert re.match(r"\d{4}-\d{2}-\d{2}$", r.date), r
        m = re.match(r"\d+ passed, (\d+) failed", r.result)
        assert m, f"a recorded run without its counts: {r}"
        assert m.group(1) == "0" or "(open: test_" in r.result, f"a recorded run failed without naming the test: {r}"
    docs = (ROOT / "docs" / "compatibility.md").read_text()
    for r in versions.TESTED:
        assert r.torch in docs and r.triton in docs and r.date in docs, f"docs/compatibility.md lacks the run {r}"


@pytest.mark.parametrize("torch_v, triton_v, inside", [
    ("2.5.0", "3.1.0", True),
    ("2.11.0+cu130", "3.6.0", True),
    ("2.15.1", "3.9.2", True),  # a patch release of the newest tested minor
    ("2.4.1", "3.0.0", False),  # older than the bound
    ("2.16.0", "3.9.0", False),  # a newer minor than any tested
    ("2.15.0", "3.10.0", False),
    ("2.6.0a0+git1234", None, True),  # no triton: only torch is checked
])
def test_outside_range(torch_v, triton_v, inside, monkeypatch):
    monkeypatch.setattr(versions, "TESTED", (
        versions.TestedRun("2.5.0", "3.1.0", "3.11.7", "12.4", "2026-01-01", "1 passed, 0 failed, 0 skipped"),
        versions.TestedRun("2.15.0", "3.9.0", "3.11.7", "13.0", "2026-01-01", "1 passed, 0 failed, 0 skipped")))
    monkeypatch.setattr(versions, "MIN_TORCH", "2.5.0")
    monkeypatch.setattr(versions, "MIN_TRITON", "3.1.0")
    reason = versions.outside_range(torch_v, triton_v)
    assert (reason == "") == inside, reason


def test_check_warns_once_outside_the_range(monkeypatch):
    monkeypatch.setattr(versions, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"torch 1\.0\.0 is older than the oldest supported"):
        info = versions.check("1.0.0", None)
    assert info["in_tested_range"] is False and "older" in info["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check("1.0.0", None)  # once per process
        assert versions.check(versions.MIN_TORCH, versions.MIN_TRITON)["in_tested_range"] is True


def test_backend_info_places_the_installed_versions():
    info = backend_info()
    assert info["torch"] == torch.__version__
    assert info["tested_range"].startswith(f"torch {versions.MIN_TORCH} .. ")
    expected = versions.outside_range(torch.__version__, _backend.TRITON_VERSION) == ""
    assert info["in_tested_range"] is expected
    assert ("versions" in info["reasons"]) is (not expected)


def test_import_outside_the_range_warns_once_naming_the_versions():
    code = ("import warnings, torch; torch.__version__ = '2.99.0'; warnings.simplefilter('always');\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import crmvae_fast; crmvae_fast.backend_info(); crmvae_fast.backend_info()\n"
            "msgs = [str(x.message) for x in w if 'tested with' in str(x.message)]\n"
            "print(len(msgs)); print(msgs[0] if msgs else '')\n"
            "print(crmvae_fast.backend_info()['in_tested_range'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, msg, inside = out.stdout.strip().splitlines()[-3:]
    assert count == "1" and "torch 2.99.0 is newer than the newest tested" in msg and inside == "False", out.stdout


# the buggy conversion as triton 3.6 (through the patch scope) and 3.4 (set directly) write it
BUGGY = {
    "scope": ("def _patch_lang_tensor(tensor, scope):\n"
              "    scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data))\n"),
    "direct": ("def _patch_lang_tensor(tensor):\n"
               "    tensor.__index__ = lambda self: int(self.handle.data)\n"),
}


class _Scope:
    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


@pytest.mark.parametrize("style", sorted(BUGGY))
def test_interpreter_index_fix_on_a_buggy_interpreter(style, monkeypatch):
    np = pytest.importorskip("numpy")
    mod = types.ModuleType("fake_interpreter")
    exec(BUGGY[style], mod.__dict__)
    monkeypatch.setattr("inspect.getsource", lambda obj: BUGGY[style])

    class Tensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)

    assert _backend.fix_interpreter_index(mod) is True
    mod._patch_lang_tensor(Tensor, *((_Scope(),) if style == "scope" else ()))
    assert list(range(0, Tensor(np.array([10])), 4)) == [0, 4, 8]  # numpy >= 2.4: int(array of shape (1,)) fails
    assert _backend.fix_interpreter_index(mod) is False  # already wrapped


def test_interpreter_index_fix_leaves_a_fixed_interpreter_alone(monkeypatch):
    mod = types.ModuleType("fixed")
    src = "def _patch_lang_tensor(tensor, scope):\n    pass  # int(self.handle.data.squeeze())\n"
    exec(src, mod.__dict__)
    monkeypatch.setattr("inspect.getsource", lambda obj: src)
    before = mod._patch_lang_tensor
    assert _backend.fix_interpreter_index(mod) is False and mod._patch_lang_tensor is before


@needs_kernels
def test_kernel_with_a_runtime_loop_bound_runs(device):
    """A loop ``range(0, n, BLOCK)`` over a runtime ``n`` (the D loop of the latent step, the G loop of the
    likelihood): under triton 3.6 with numpy >= 2.4 the interpreter raised TypeError('only 0-dimensional arrays
    can be converted to Python scalars') here until the fix."""
    from crmvae_fast.ops import latent_step

    mu = torch.randn(2, 3, 40, device=device)
    lv = torch.randn(2, 3, 40, device=device)
    out = latent_step(mu, lv, eps_J=torch.zeros(3, 40, device=device), eps=torch.zeros(2, 3, 40, device=device))
    torch.testing.assert_close(out.z_J, out.mu_J)
