"""`python -m builder`: build-flasher (builder/cli.py)."""

import sys

from .cli import main

sys.exit(main())
