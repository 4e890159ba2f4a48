"""``python -m nnaccel``: the nnaccel command, where the environment's scripts are not on PATH."""

import sys

from .cli import main

sys.exit(main())
