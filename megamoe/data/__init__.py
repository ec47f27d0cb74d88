"""Data: mock token streams, indexed datasets, tokenizers."""
