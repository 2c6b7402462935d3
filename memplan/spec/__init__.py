"""Frozen, validated specs: the model, the GPU, the training setup."""
