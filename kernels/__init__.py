"""Triton kernels, installed as moe.kernels. Importing this package imports no Triton."""
