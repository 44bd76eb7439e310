"""Kernel and product benchmarks and the int8 gates (``python -m bench.kernels.<name>``)."""
