#!/usr/bin/env python3
"""Run many agents in one process and one event loop: the fleet of a load test (splitft.bench.fleet); --help says how."""

import sys

from splitft.bench.fleet import main

if __name__ == "__main__":
    sys.exit(main())
