"""The CUDA kernel of the extension (csrc/iw_logsumexp_cuda.cu) compiles for A100 (sm_80) and H100 (sm_90)
with nvcc and torch's headers, flags and defines: the check CI can make without a GPU."""

import inspect
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCE = ROOT / "csrc" / "iw_logsumexp_cuda.cu"


def _nvcc():
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    if cpp_extension.CUDA_HOME and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        return str(Path(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    return None


def _torch_cuda_includes():
    """torch's include dirs for a CUDA build; the keyword changed from ``cuda=True`` to ``device_type``."""
    if "device_type" in inspect.signature(cpp_extension.include_paths).parameters:
        return cpp_extension.include_paths(device_type="cuda")
    return cpp_extension.include_paths(cuda=True)


def _cxx_std():
    """The C++ standard torch's headers need: ATen asks for C++20 from torch 2.10 on, C++17 before."""
    aten = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    return "c++20" if aten.exists() and "202002L" in aten.read_text() else "c++17"


def _runtime_includes(nvcc, tmp_path):
    """Extra dirs holding the CUDA runtime headers when nvcc does not find them itself (a toolkit without
    headers next to pip's ``nvidia-cuda-runtime`` wheels, which put them in site-packages/nvidia/cu*/include)."""
    probe = tmp_path / "probe.cu"
    probe.write_text("#include <cuda_runtime.h>\n")
    ok = subprocess.run([nvcc, "-E", str(probe), "-o", str(tmp_path / "probe.ii")], capture_output=True)
    if ok.returncode == 0:
        return []
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    return [str(p) for p in sorted(site.glob("cu*/include")) + sorted(site.glob("cuda_runtime/include"))]


def test_cuda_kernel_compiles_for_sm80_and_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        reason = "nvcc not found (neither on PATH nor under CUDA_HOME): the CUDA kernel cannot be compile-checked"
        if os.environ.get("CI") == "true":  # CI's machine has nvcc: its absence there is a broken set-up
            pytest.fail(reason)
        pytest.skip(reason)
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a build without CUDA: no CUDA extension to compile")
    release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    major = re.search(r"release (\d+)\.", release)
    if major is None or major.group(1) != torch.version.cuda.split(".")[0]:
        # torch refuses to build an extension with an nvcc of another CUDA major: compiling with it proves nothing
        pytest.skip(f"nvcc at {nvcc} is CUDA {major.group(1) if major else '?'}, torch {torch.__version__} was built "
                    f"with CUDA {torch.version.cuda}: no nvcc of that major here to compile the CUDA source with")
    includes = _torch_cuda_includes() + _runtime_includes(nvcc, tmp_path)
    includes += [sysconfig.get_paths()["include"], str(CUDA_SOURCE.parent)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    obj = tmp_path / "iw_logsumexp_cuda.o"
    cmd = (
        [nvcc, "-c", str(CUDA_SOURCE), "-o", str(obj), f"-std={_cxx_std()}", "-O3", "--expt-relaxed-constexpr"]
        + common
        + ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        + ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
        + ["-Xcompiler", "-fPIC"]
        + [f"-I{p}" for p in includes]
    )
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{result.stderr[-6000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    data = obj.read_bytes()
    assert b"iw_lse_update_kernel" in data, "the kernel is missing from the object file"


def test_extension_sources_are_where_the_loader_looks():
    from crmvae_fast import _extension

    # In a checkout the loader builds from <repo>/csrc: every *.cpp, and every *.cu with CUDA.
    assert _extension.csrc_dir() == ROOT / "csrc"
    cpu = [p.name for p in _extension.sources(cuda=False)]
    cuda = [p.name for p in _extension.sources(cuda=True)]
    assert cpu == sorted(p.name for p in (ROOT / "csrc").glob("*.cpp")) and "ops.cpp" in cpu
    assert cuda == cpu + sorted(p.name for p in (ROOT / "csrc").glob("*.cu")) and CUDA_SOURCE.name in cuda
    # The ops it must register come from the registry: the custom ops of every op on the "extension" backend.
    assert "crmvae_fast::iw_lse_update" in _extension.op_names()


def test_setup_py_takes_the_same_sources():
    # setup.py globs csrc/ too: the sources it names are the loader's (read from its text, not run: running
    # setup.py builds the extension).
    text = (ROOT / "setup.py").read_text()
    assert 'glob("*.cpp")' in text and 'glob("*.cu")' in text
