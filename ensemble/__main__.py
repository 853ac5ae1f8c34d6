"""``python -m ensemble``: the same command line as ``ensemble``."""

import sys

from .cli import main

sys.exit(main())
