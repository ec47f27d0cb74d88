"""Checkpoint conversion (``hf/``: Hugging Face model families). The DCP checkpoint format
itself is ``megamoe/training/checkpoint.py``."""
