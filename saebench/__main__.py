"""`python -m saebench ...` (what `torchrun ... -m saebench train CONFIG` runs on every rank)."""

import sys

from saebench.cli import main

sys.exit(main())
