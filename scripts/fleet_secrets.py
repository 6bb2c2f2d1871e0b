#!/usr/bin/env python3
"""Make the secrets of a SplitFT fleet: CA, broker certificate, passwords, ACL, job key (splitft.tools.fleet_secrets); --help says how."""

import sys

from splitft.tools.fleet_secrets import main

if __name__ == "__main__":
    sys.exit(main())
