"""Tiny tokenizers, models and fused data built locally, for tests, benchmarks and the demo."""
