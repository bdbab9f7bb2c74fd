"""Command-line tools: data preparation, export, sweeps, inspection and benchmarks."""
