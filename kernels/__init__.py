"""Triton kernels beside plain torch references (see the GPU issue)."""
