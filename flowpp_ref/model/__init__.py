"""The Flow++ model (sec. 3, appendix 8.5): the architecture, variational dequantization,
the objective, the :class:`FlowPP` class, the presets and the release's launchers.

* :mod:`~flowpp_ref.model.architecture` -- coupling stages and the main flow;
* :mod:`~flowpp_ref.model.dequantization` -- uniform and variational dequantization (sec. 3.1);
* :mod:`~flowpp_ref.model.objective` -- log N(z), bits/dim, the importance-weighted bound;
* :mod:`~flowpp_ref.model.flowpp` -- :class:`FlowPP`: loss, gradients, sampling;
* :mod:`~flowpp_ref.model.lineage` -- the flows Flow++ improves on: :class:`RealNVP`, :class:`Glow`
  (uniform dequantization, the objective and interface of FlowPP);
* :mod:`~flowpp_ref.model.presets`, :mod:`~flowpp_ref.model.release`,
  :mod:`~flowpp_ref.model.paramcount` -- configurations and the release's settings.
"""
from flowpp_ref.model.architecture import build_main_flow, coupling_stage
from flowpp_ref.model.flowpp import FlowPP
from flowpp_ref.model.lineage import Glow, RealNVP, model_class

__all__ = ["FlowPP", "Glow", "RealNVP", "build_main_flow", "coupling_stage", "model_class"]
