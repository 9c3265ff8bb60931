"""flowpp-ref: Flow++ (Ho et al., 2019) with every derivative written by hand.

Array code for NumPy (hot loops in numba) and CuPy; no autograd library. The package follows
the paper:

* :mod:`flowpp_ref.core` -- array backend, module protocol, validation, finite differences;
* :mod:`flowpp_ref.bijections` -- the invertible layers (appendix 8.1-8.2), with the
  mixture-of-logistics CDF and its inverse beside the coupling transforms;
* :mod:`flowpp_ref.nn` -- the coupling networks' layers (sec. 3.2.2, appendix 8.3);
* :mod:`flowpp_ref.model` -- architecture, dequantization, objective, :class:`FlowPP`, presets; the flows
  Flow++ improves on, :class:`RealNVP` and :class:`Glow` (:mod:`flowpp_ref.model.lineage`);
* :mod:`flowpp_ref.training` -- optimiser, schedules, the loop, evaluation;
* :mod:`flowpp_ref.runtime` -- checkpoints, run folders, options, distributed runs;
* :mod:`flowpp_ref.datasets` -- CIFAR-10, ImageNet, CelebA, a user's images, the embedded set;
* :mod:`flowpp_ref.cli` -- the ``flowpp`` command;
* :mod:`flowpp_ref.kernels` -- numba and CUDA twins of the hot loops.

What a user imports is here::

    from flowpp_ref import FlowPP, get_preset, train, evaluate, load_model
    from flowpp_ref import RealNVP, Glow          # FlowPP's predecessors, same interface

The names load on first use, so ``import flowpp_ref`` alone imports neither NumPy nor numba
and changes no environment variable (:func:`tune_threads` is an explicit call).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FlowPP": "flowpp_ref.model.flowpp",
    "RealNVP": "flowpp_ref.model.lineage",
    "Glow": "flowpp_ref.model.lineage",
    "get_preset": "flowpp_ref.model.presets",
    "train": "flowpp_ref.training.loop",
    "evaluate": "flowpp_ref.training.evaluation",
    "load_model": "flowpp_ref.training.loop",
    "load_default_dataset": "flowpp_ref.datasets.default",
    "tune_threads": "flowpp_ref.runtime.threads",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowpp_ref' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
