"""flowpp-ref: Flow++ (Ho et al., 2019) with every derivative written by hand.

Array code for NumPy (hot loops in numba) and CuPy; no autograd library.
See README.md for the map from the paper to the modules.
"""
__version__ = "0.1.0"
