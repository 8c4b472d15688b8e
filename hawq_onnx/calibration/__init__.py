"""Streaming activation calibration: histograms per tensor, ranges by several methods."""

from hawq_onnx.calibration.collector import CalibrationStats, collect_statistics
from hawq_onnx.calibration.histogram import DEFAULT_BINS, StreamingHistogram
from hawq_onnx.calibration.ranges import select_range

__all__ = ["DEFAULT_BINS", "CalibrationStats", "StreamingHistogram", "collect_statistics",
           "select_range"]
