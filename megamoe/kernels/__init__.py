"""Kernels below the layers: FP8 quantization and the FP8 GEMMs (imported by parallel/ and model/)."""
