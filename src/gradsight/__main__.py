"""``python -m gradsight``."""

import sys

from gradsight.cli import main

sys.exit(main())
