"""``python -m fastrelay serve ...``"""

import sys

from .cli import main

sys.exit(main())
