"""The README's example runs and prints what the README shows under it: the same lines, with numbers where the
README has numbers (their values vary with the machine and the versions, the format does not). It runs in a fresh
Python without ``TRITON_INTERPRET`` and with CUDA hidden, as a CPU-only newcomer's would, and the folder it saves
loads in MultiVae."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBER = r"-?\d+(?:\.\d+)?"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _blocks(text: str, lang: str) -> list:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _pattern(line: str) -> str:
    """A regex for one shown output line: the text as is, each number a number."""
    parts = re.split(NUMBER, line)
    return "^" + NUMBER.join(re.escape(p) for p in parts) + "$"


def test_readme_example_prints_what_the_readme_shows(tmp_path):
    example = _section("Example")
    code, shown = _blocks(example, "python"), _blocks(example, "text")
    assert len(code) == 1 and len(shown) == 1, "the README's Example section must hold one python and one text block"
    shown_lines = shown[0].strip().splitlines()
    assert shown_lines and re.search(NUMBER, shown[0]), f"the README shows no output for its example: {shown[0]!r}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a CPU-only newcomer's set-up
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", code[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"the README's example failed:\n{run.stderr[-3000:]}"
    printed = run.stdout.strip().splitlines()
    assert len(printed) == len(shown_lines), f"the example printed {printed}, the README shows {shown_lines}"
    for got, want in zip(printed, shown_lines):
        assert re.match(_pattern(want), got), f"the example printed {got!r}, the README shows {want!r}"
    if "model.save(" in code[0]:  # the folder the example saves loads in MultiVae
        multivae = pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is in the test extras")
        assert multivae.CRMVAE.load_from_folder(str(tmp_path / "my_model")).latent_dim == 16
