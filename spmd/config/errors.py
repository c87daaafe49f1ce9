"""The error every check raises for bad input, and the FP8 block size the checks and the loader share."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input or topology: reported once by rank 0, every rank exits non-zero."""


FP8_BLOCK = 128  # rows and columns of one `weight_scale_inv` block of an FP8 checkpoint weight
