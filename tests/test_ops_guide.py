"""The examples of ``docs/ops_guide.md`` run, so the guide cannot rot: every ```python block, in order, in one
namespace. The blocks assert that MVTCAE's, MVAE's and MoPoE's latent math rebuilt from ``crmvae_fast.ops``, and
a batched joint NLL, give MultiVae 1.0.3's numbers on MultiVae's own model objects."""

import re
from pathlib import Path

import pytest

pytest.importorskip("multivae", reason="MultiVae 1.0.3 (the outside witness of the guide) is not installed")

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "ops_guide.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def test_guide_has_examples():
    assert len(BLOCKS) >= 5, f"expected the set-up, MVTCAE, MVAE, MoPoE and NLL blocks in {GUIDE}, found {len(BLOCKS)}"


def test_guide_examples_run():
    namespace = {"__name__": "ops_guide"}
    for i, block in enumerate(BLOCKS):
        code = compile(block, f"{GUIDE.name}[block {i}]", "exec")
        exec(code, namespace)  # noqa: S102 - our own documentation, asserting against MultiVae
