"""CUDA kernels (CuPy RawKernel), each the twin of a plain-array function and of a numba kernel."""
