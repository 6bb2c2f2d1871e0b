#!/usr/bin/env python3
"""The SplitFT benchmark study (splitft.bench.study); python scripts/study.py --help."""

import sys

from splitft.bench.study import main

if __name__ == "__main__":
    sys.exit(main())
