"""Triton kernels of moa-flex, each with a pure-torch reference twin."""
