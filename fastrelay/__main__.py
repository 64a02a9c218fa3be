"""``python -m fastrelay serve|mint|put|get ...`` (same as the ``fastrelay`` command)."""

import sys

from .cli import main

sys.exit(main())
