"""Kernels behind the mixers: each fast path sits beside its slow reference."""
