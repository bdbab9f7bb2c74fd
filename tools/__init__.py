"""Command-line tools: data preparation (``prepare_data``), export (``convert_to_hf``, ``hf_generate``),
checkpoint inspection (``inspect_checkpoint``) and benchmarks (``bench_*``)."""
