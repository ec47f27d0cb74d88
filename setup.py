"""Install megamoe: `pip install -e .` (add `[dev]` for the tests, `[te]` for Transformer Engine).

The dataset index builders in megamoe/data/helpers.cpp are compiled as the optional extension
megamoe.data._helpers_cpp. Without a C++ compiler (or pybind11) the install still succeeds and
megamoe/data/helpers.py uses its numpy versions, which give identical indices.
"""

import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the C++ helpers if possible; on any compiler failure, warn and go on without them."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # no compiler, no headers: the numpy fallback serves
            self._warn(err)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:
            self._warn(err)

    @staticmethod
    def _warn(err):
        print(f"WARNING: megamoe's C++ dataset helpers were not built ({err}); "
              "the numpy fallback will be used.", file=sys.stderr)


def _extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: pybind11 not found; megamoe's C++ dataset helpers are skipped.", file=sys.stderr)
        return []
    return [Pybind11Extension("megamoe.data._helpers_cpp", ["megamoe/data/helpers.cpp"],
                              cxx_std=17, extra_compile_args=["-O3"])]


setup(
    name="megamoe",
    version="0.1.0",
    description="Pretraining of Mixture-of-Experts language models in five parallel dimensions",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        # Any torch from 2.11 on: the CPU wheel 2.13 in CI, the CUDA 2.11 image on the GPUs.
        "torch>=2.11",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "pyyaml",
        # the expert-load heat map in tensorboard (rendered headless; skipped if missing)
        "matplotlib>=3.6",
        # --tokenizer-type HuggingFaceTokenizer (DeepSeek, Qwen, Mixtral ship tokenizer.json)
        "tokenizers",
        # tools/convert_checkpoint.py reads and writes Hugging Face's weight files
        "safetensors",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # transformers: the conversion tests compare logits with its models (DeepSeek-V2/V3, Mixtral, Qwen3-MoE)
        "dev": ["pytest>=7", "pybind11>=2.10", "transformers>=4.57"],
    },
)
