"""The SplitFT edge agent (`splitft-agent`)."""
