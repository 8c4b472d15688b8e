"""hawq-onnx: Hessian-aware mixed-precision post-training quantization for ONNX models."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``hawq_onnx.analyze`` without importing torch for ``hawq-onnx --version``."""
    if name == "analyze":
        from hawq_onnx.analysis import analyze

        return analyze
    raise AttributeError(f"module 'hawq_onnx' has no attribute {name!r}")
