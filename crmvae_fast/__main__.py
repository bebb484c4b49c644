"""``python -m crmvae_fast``: the ``crmvae-fast`` command (see :mod:`crmvae_fast.cli`)."""

import sys

from .cli import main

sys.exit(main())
