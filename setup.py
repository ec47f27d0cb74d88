"""Install megamoe: `pip install -e .` (add `[dev]` for the tests, `[te]` for Transformer Engine)."""

from setuptools import find_packages, setup

setup(
    name="megamoe",
    version="0.1.0",
    description="Pretraining of Mixture-of-Experts language models in five parallel dimensions",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    install_requires=[
        # Any torch from 2.11 on: the CPU wheel 2.13 in CI, the CUDA 2.11 image on the GPUs.
        "torch>=2.11",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest>=7", "pybind11>=2.10"],
    },
)
