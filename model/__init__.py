"""The plain (parallelism-free) structured GPT: config, structured linear family, model."""
