"""Graph passes, installed as ``hawq_onnx.passes``.

Every pass has one interface (:class:`~hawq_onnx.passes.base.GraphPass`): a callable that
takes an ``onnx.ModelProto`` and returns ``(model, PassReport)``. Passes never mutate their
input; they return a new model (or the same object when nothing changed).
"""

from hawq_onnx.passes.base import GraphPass, PassReport, run_passes

__all__ = ["GraphPass", "PassReport", "run_passes"]
