"""Model zoo: scripts that train and export the committed ONNX models (see README.md)."""
