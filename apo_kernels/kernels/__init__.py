"""Triton kernels and their launchers: shapes, strides and tiles only; no autograd, no policy.

Importing this package imports triton; callers that must work without triton (the torch
fallback, the CLI on a machine without it) import it lazily.
"""
