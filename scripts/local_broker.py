#!/usr/bin/env python3
"""Start a Mosquitto broker on 127.0.0.1 with its own config, for tests, benchmarks and trying things (splitft.coordinator.brokers); --help says how."""

import sys

from splitft.coordinator.brokers import main

if __name__ == "__main__":
    sys.exit(main())
