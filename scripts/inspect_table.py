#!/usr/bin/env python3
"""View the calls in flight in an mpflight table: the same code as ``mpflight inspect``.

scripts/inspect_table.py NAME [--watch] [--json]
"""

import sys

from mpflight._cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
