"""What every other part stands on: the array backend (NumPy or CuPy), the module protocol
(parameters, gradients as dicts keyed like ``parameters()``), input validation, and the one
finite-difference checker the tests and tutorials use."""
