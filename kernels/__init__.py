"""Triton kernels of the swallow-stream engine (installed as `swallow_kernels`)."""
