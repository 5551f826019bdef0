"""`mlxlora eval --tasks`: lm-evaluation-harness benchmarks on the base and unfused adapters (in progress)."""
