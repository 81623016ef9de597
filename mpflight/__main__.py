"""``python -m mpflight``: the same as the ``mpflight`` command."""

import sys

from ._cli import main

sys.exit(main())
