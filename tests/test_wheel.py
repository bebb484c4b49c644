"""A wheel of the package carries every module and the C++/CUDA sources (as ``crmvae_fast/csrc``), and an
installed copy finds those sources outside any checkout, so it can still JIT-build the extension.

The wheel is built from a copy of the tracked files with ``CRMVAE_FAST_SKIP_EXT=1`` (no compilation: the test
checks packaging, not the compiler; ``tests/test_iw_logsumexp.py`` covers the built extension)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_files() -> list:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout ({r.stderr.strip()[:200]}): cannot tell which files a wheel must hold")
    return [p for p in r.stdout.splitlines() if p and (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode != 0:
        pytest.skip("pip is not available: no wheel can be built")
    src = tmp_path_factory.mktemp("src")
    for rel in _tracked_files():
        if rel.startswith("benchmarks/results/"):
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, CRMVAE_FAST_SKIP_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                        str(out), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheels = list(out.glob("crmvae_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_every_module_and_the_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "crmvae_fast").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, (f"modules missing from the wheel: {missing}; add their package to [tool.setuptools] "
                         "packages in pyproject.toml")
    sources = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh")}
    shipped = {n.split("/", 2)[2] for n in names if n.startswith("crmvae_fast/csrc/")}
    assert sources and sources == shipped, f"csrc/ has {sorted(sources)}, the wheel's crmvae_fast/csrc {sorted(shipped)}"
    assert any(n.endswith("entry_points.txt") for n in names)


LOCATE = r"""
import crmvae_fast, crmvae_fast._extension as ext
print("PKG", crmvae_fast.__file__)
print("CSRC", ext.csrc_dir())
print("SOURCES", ",".join(p.name for p in ext.sources(cuda=True)))
"""


def test_installed_copy_finds_its_sources(wheel, tmp_path):
    # Unpacked wheel = an installed copy (site-packages layout), imported from a directory with no checkout.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site), CRMVAE_FAST_NO_JIT="1")
    r = subprocess.run([sys.executable, "-c", LOCATE], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if " " in ln)
    assert lines["PKG"].startswith(str(site)), lines
    assert lines["CSRC"] == str(site / "crmvae_fast" / "csrc")
    expected = sorted(p.name for p in (ROOT / "csrc").glob("*.cpp")) + sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    assert lines["SOURCES"].split(",") == expected
