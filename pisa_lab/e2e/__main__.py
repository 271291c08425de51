"""``python -m pisa_lab.e2e``."""

import sys

from .cli import main

sys.exit(main())
