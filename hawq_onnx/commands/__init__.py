"""One module per CLI subcommand (see :mod:`hawq_onnx.cli`)."""
