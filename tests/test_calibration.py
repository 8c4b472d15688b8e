"""Streaming calibration: exact histograms, range methods, onnxruntime collection, memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.calibration import StreamingHistogram, collect_statistics, select_range
from hawq_onnx.calibration.ranges import kl_threshold
from hawq_onnx.data import load_npz
from hawq_onnx.quant.activations import act_qparams
from hawq_onnx.quant.plan import ActSpec

ASYM8 = ActSpec(8)


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range grows several times (forcing re-binning) on both sides."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, s, 5000).astype(np.float32) for s in (0.01, 0.3, 1.0, 7.0)] + [
        rng.uniform(-40, 2, 3000).astype(np.float32)]


def test_streamed_histogram_equals_one_histogram_of_all_data() -> None:
    hist = StreamingHistogram(2048)
    batches = _batches()
    for batch in batches:
        hist.update(batch)
    data = np.concatenate(batches)
    assert hist.min == float(data.min()) and hist.max == float(data.max())
    assert hist.count == data.size == int(hist.counts.sum())
    expected, _ = np.histogram(data.astype(np.float64), bins=hist.edges())
    np.testing.assert_array_equal(hist.counts, expected)
    assert np.count_nonzero(hist.counts) > 0
    span = hist.max - hist.min
    assert span / hist.width > 2048 / 2 - 2  # at least half the bins span the data


def test_merge_and_batch_order_do_not_change_the_result() -> None:
    batches = _batches(1)
    forward, backward, merged = (StreamingHistogram(1024) for _ in range(3))
    for batch in batches:
        forward.update(batch)
    for batch in reversed(batches):
        backward.update(batch)
    part_a, part_b = StreamingHistogram(1024), StreamingHistogram(1024)
    for batch in batches[:2]:
        part_a.update(batch)
    for batch in batches[2:]:
        part_b.update(batch)
    merged.merge(part_b)
    merged.merge(part_a)
    for other in (backward, merged):
        assert other.width == forward.width and other.start == forward.start
        np.testing.assert_array_equal(other.counts, forward.counts)


def test_zeros_nans_and_constant_tensors() -> None:
    hist = StreamingHistogram(64)
    hist.update(np.array([0.0, 0.0, 1.0, np.nan, 2.0], np.float32))
    assert hist.count == 4 and hist.zeros == 2 and (hist.min, hist.max) == (0.0, 2.0)
    const = StreamingHistogram(64)
    const.update(np.full(10, 3.5, np.float32))
    assert select_range(const, "entropy", ASYM8) == (3.5, 3.5)
    assert select_range(StreamingHistogram(64), "mse", ASYM8) == (0.0, 0.0)


def test_folded_histogram_is_the_histogram_of_absolute_values() -> None:
    hist = StreamingHistogram(512)
    data = np.random.default_rng(3).normal(-1, 2, 20000).astype(np.float32)
    hist.update(data)
    folded, width = hist.folded()
    expected, _ = np.histogram(np.abs(data.astype(np.float64)),
                               bins=np.arange(folded.size + 1) * width)
    np.testing.assert_array_equal(folded, expected)


def _quant_error(data: np.ndarray, low: float, high: float, spec: ActSpec) -> float:
    params = act_qparams(low, high, spec)
    return float(np.square(params.fake_quantize(data) - data).mean())


def _hist(data: np.ndarray, bins: int = 4096) -> StreamingHistogram:
    hist = StreamingHistogram(bins)
    for part in np.array_split(data, 7):
        hist.update(part)
    return hist


def test_percentile_clips_the_requested_tails() -> None:
    data = np.random.default_rng(4).uniform(-1, 3, 200_000).astype(np.float32)
    hist = _hist(data)
    low, high = select_range(hist, "percentile", ASYM8, percentile=98.0)
    # 1 % in each tail of U(-1, 3): -0.96 and 2.96, up to one bin width
    assert abs(low - -0.96) <= 2 * hist.width and abs(high - 2.96) <= 2 * hist.width
    sym_low, sym_high = select_range(hist, "percentile", ActSpec(8, True), percentile=98.0)
    assert sym_low == max(hist.min, -sym_high)
    assert abs(sym_high - np.percentile(np.abs(data), 98.0)) <= 2 * hist.width


def test_clipping_methods_drop_a_far_outlier_that_minmax_keeps() -> None:
    rng = np.random.default_rng(5)
    data = np.maximum(rng.normal(0, 1, 100_000), 0).astype(np.float32)
    data[17] = 200.0  # one outlier: minmax wastes 97 % of the grid on it
    hist = _hist(data)
    assert select_range(hist, "minmax", ASYM8) == (0.0, 200.0)
    bulk = np.delete(data, 17)
    minmax_err = _quant_error(bulk, 0.0, 200.0, ASYM8)
    # (mse keeps it: one sample's clipping error outweighs 100k rounding errors, correctly)
    for method, most in (("percentile", 10.0), ("entropy", 40.0)):
        low, high = select_range(hist, method, ASYM8, percentile=99.99)
        # KL cannot go below 256 (levels) of its <= 2048 bins over [0, 200]: 1/8 of the range
        assert low == 0.0 and 2.0 < high < most, method
        assert _quant_error(bulk, low, high, ASYM8) < minmax_err / 10, method


def test_mse_range_minimizes_the_real_quantization_error() -> None:
    data = np.random.default_rng(6).laplace(0.5, 1.0, 100_000).astype(np.float32)
    hist = _hist(data)
    for spec in (ASYM8, ActSpec(8, True)):
        best = _quant_error(data, *select_range(hist, "mse", spec), spec)
        for method in ("minmax", "percentile", "entropy"):
            other = _quant_error(data, *select_range(hist, method, spec), spec)
            assert best <= other * 1.02, (spec, method)


def _reference_kl_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """TensorRT's entropy calibration written out plainly (every candidate, no shortcuts)."""
    best, best_kl = counts.size, np.inf
    for stop in range(levels, counts.size + 1):
        p = counts[:stop].astype(np.float64).copy()
        p[-1] += counts[stop:].sum()
        candidate = counts[:stop].astype(np.float64)
        q = np.zeros(stop)
        level_of = [i * levels // stop for i in range(stop)]  # bin -> quantization level
        for level in range(levels):
            bins = [i for i in range(stop) if level_of[i] == level]
            members = [i for i in bins if candidate[i] > 0]
            for i in members:
                q[i] = candidate[bins].sum() / len(members)
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = stop, kl
    return best * width


def test_kl_threshold_matches_a_plain_reference_implementation() -> None:
    rng = np.random.default_rng(7)
    for sample in (rng.normal(0, 1, 200_000), rng.laplace(0, 1, 200_000),
                   rng.exponential(1, 200_000)):
        counts, edges = np.histogram(np.abs(sample), bins=200, range=(0, np.abs(sample).max()))
        width = float(edges[1])
        assert kl_threshold(counts, width, 32) == pytest.approx(
            _reference_kl_threshold(counts, width, 32), rel=1e-9)
    uniform = np.full(2048, 1000.0)
    assert kl_threshold(uniform, 1.0, 128) >= 2048 * 0.95  # nothing worth clipping


def test_entropy_ignores_the_relu_zero_spike() -> None:
    """Half the values are exact zeros (ReLU): they must not pull the threshold to the
    smallest candidate, as a KL over the raw histogram would."""
    data = np.maximum(np.random.default_rng(8).normal(0, 1, 200_000), 0).astype(np.float32)
    low, high = select_range(_hist(data), "entropy", ASYM8)
    assert low == 0.0 and 2.5 < high <= float(data.max())


# ------------------------------------------------------------------------ collection


def _two_input_model(batch: int | str = "N") -> onnx.ModelProto:
    """y = relu(a @ W) + b, with the intermediate tensors named."""
    w = numpy_helper.from_array(np.random.default_rng(9).standard_normal((6, 4)).astype(
        np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W"], ["mm"]),
         helper.make_node("Relu", ["mm"], ["act"]),
         helper.make_node("Add", ["act", "b"], ["y"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 6]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _write_data(path: Path, n: int, seed: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"a": rng.standard_normal((n, 6)).astype(np.float32),
              "b": rng.uniform(-3, 3, (n, 4)).astype(np.float32)}
    np.savez(path, **arrays)
    return arrays


def test_collection_matches_the_full_data_for_every_tensor(tmp_path: Path) -> None:
    model = _two_input_model()
    arrays = _write_data(tmp_path / "calib.npz", 50)
    dataset = load_npz(tmp_path / "calib.npz", model)
    stats = collect_statistics(model, ["a", "b", "mm", "act", "y"], dataset, batch_size=8,
                               bins=256)
    assert stats.samples == 50 and stats.batches == 7
    weight = numpy_helper.to_array(model.graph.initializer[0])
    mm = arrays["a"] @ weight
    full = {"a": arrays["a"], "b": arrays["b"], "mm": mm, "act": np.maximum(mm, 0),
            "y": np.maximum(mm, 0) + arrays["b"]}
    for name, values in full.items():
        hist = stats.histograms[name]
        assert hist.count == values.size, name
        np.testing.assert_allclose([hist.min, hist.max], [values.min(), values.max()],
                                   rtol=1e-5, err_msg=name)
    assert stats.histograms["act"].zeros == int(np.sum(mm <= 0))


def test_a_fixed_batch_dimension_is_respected(tmp_path: Path) -> None:
    model = _two_input_model(batch=5)
    _write_data(tmp_path / "calib.npz", 20)
    stats = collect_statistics(model, ["mm"], load_npz(tmp_path / "calib.npz", model),
                               batch_size=64)
    assert stats.batches == 4 and stats.samples == 20  # batches of 5, not 64


def test_calibration_memory_does_not_grow_with_the_number_of_samples(tmp_path: Path) -> None:
    """Peak traced memory while streaming 16x more samples stays flat (the data itself is
    loaded before tracing starts)."""
    model = _two_input_model()
    peaks = []
    for n in (256, 4096):
        _write_data(tmp_path / f"calib{n}.npz", n)
        dataset = load_npz(tmp_path / f"calib{n}.npz", model)
        tracemalloc.start()
        collect_statistics(model, ["a", "mm", "act", "y"], dataset, batch_size=64)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0] + 64 * 1024, peaks
