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

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE
