"""Test set-up shared by every test file.

Without a GPU the Triton kernels are tested through the interpreter: ``TRITON_INTERPRET=1`` has to be set
before ``crmvae_fast`` (and so triton) is imported, which is why it happens here, at collection time. On a
machine with a GPU the kernels run for real and the interpreter stays off. Set ``TRITON_INTERPRET=0`` to test
the eager CPU fallbacks instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # CI runs the property tests on a fixed set of examples (a red run must mean a change broke something, not
    # that a new random example turned up); on a developer's machine they draw fresh examples each run.
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    if os.environ.get("CI") == "true":
        settings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    pass

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from crmvae_fast import _backend  # noqa: E402  (after TRITON_INTERPRET is set)

#: For tests of the Triton kernels themselves: ``from conftest import needs_kernels``.
needs_kernels = pytest.mark.skipif(
    not _backend.triton_runs_on(DEVICE),
    reason="the Triton kernels cannot run here: no GPU and TRITON_INTERPRET!=1 (conftest sets it without a GPU)",
)


@pytest.fixture
def device():
    return DEVICE
