"""numba kernels for the CPU, each the twin of a plain-array function that the tests compare it with."""
