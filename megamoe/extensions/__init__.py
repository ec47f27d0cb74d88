"""Optional accelerated backends. Only te.py imports Transformer Engine."""
