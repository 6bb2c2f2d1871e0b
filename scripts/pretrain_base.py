#!/usr/bin/env python3
"""Pretrain a small base model worth fine-tuning (splitft.tools.pretrain); --help says how."""

import sys

from splitft.tools.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
