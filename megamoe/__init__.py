"""megamoe: pretraining of Mixture-of-Experts language models in five parallel dimensions."""

__version__ = "0.1.0"
