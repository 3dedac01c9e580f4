"""Compute kernels: the Triton GPU kernels and the CPU paths. They implement primitives defined in
docs/ARCHITECTURE.md and know nothing of models or of what a number format means."""
