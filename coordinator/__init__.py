"""The SplitFT coordinator (`splitft-coordinator`), which runs the server segment on the GPU host."""
