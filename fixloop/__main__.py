"""``python -m fixloop``: the same as the ``fixloop`` command."""

import sys

from fixloop.cli import main

sys.exit(main())
