"""Second-order information through the autograd mirror (HAWQ / HAWQ-V2 / PyHessian).

* :mod:`.hvp`: Hessian-vector products (double backprop, forward-over-reverse);
* :mod:`.hutchinson`: per-layer traces from one global probe, SE stopping rule;
* :mod:`.eigen`: top-k eigenvalues (Lanczos, power iteration with deflation);
* :mod:`.density`: spectral density by stochastic Lanczos quadrature;
* :mod:`.activations`: Hessian traces w.r.t. activation tensors;
* :mod:`.result`, :mod:`.cache`: typed JSON results and the on-disk cache.

The public entry point is :func:`hawq_onnx.analysis.analyze`.
"""

from hawq_onnx.hessian.hvp import HVP_MODES, HessianVectorProduct
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.hessian.result import AnalysisResult, LayerResult

__all__ = ["HVP_MODES", "AnalysisResult", "HessianVectorProduct", "LayerResult", "Objective"]
