"""Quantization: the scheme as data, round-to-nearest and GPTQ solvers, and bit packing."""
