"""Mirror vs onnxruntime on real data: is the autograd mirror the same function as the model?

Why: every Hessian and every quantization decision is computed on the mirror, but the model
that ships runs in onnxruntime. If the two disagree on the user's data, the analysis is of
the wrong function; this check says so before anything else runs.

Relative error is *scale-relative*: ``max|mirror - ort| / max(max|ort|, 1e-6)`` per output
over all samples. Elementwise relative error explodes on outputs that cross zero (logits,
pre-activations) and would fail correct implementations; dividing by the output's own
magnitude measures error against the size of what the output carries. The 1e-6 floor only
matters for outputs that are essentially zero everywhere, where it makes the test stricter,
never looser. NaN in the same places in both counts as agreement; anywhere else as infinite
error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from hawq_onnx.data import Dataset
from hawq_onnx.errors import InvalidDataError, InvalidModelError
from hawq_onnx.progress import progress

DEFAULT_TOLERANCE = 1e-4
SCALE_FLOOR = 1e-6


@dataclass
class OutputParity:
    """Agreement of one model output over all samples."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    ref_max_abs: float = 0.0
    ok: bool = True
    problem: str = ""  # a shape disagreement, when there is one

    def update(self, got: np.ndarray, want: np.ndarray) -> None:
        """Fold one batch into the running maxima."""
        if got.shape != want.shape:
            self.problem = f"shape {got.shape} vs onnxruntime {want.shape}"
            self.max_abs = float("inf")
            return
        diff, scale = _abs_diff(got, want)
        self.max_abs = max(self.max_abs, diff)
        self.ref_max_abs = max(self.ref_max_abs, scale)

    def finish(self, tolerance: float) -> None:
        self.max_rel = self.max_abs / max(self.ref_max_abs, SCALE_FLOOR)
        self.ok = not self.problem and self.max_rel <= tolerance


def _abs_diff(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, max |want|) in float64, NaNs matched by position."""
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(want, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if np.any(nan_a != nan_b):
        return float("inf"), _finite_max(b)
    both = ~nan_a
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        diff = np.where(a[both] == b[both], 0.0, np.abs(a[both] - b[both]))
    return (float(diff.max()) if diff.size else 0.0), _finite_max(b)


def _finite_max(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


@dataclass
class ParityReport:
    """Per-output agreement, plus how much data the verdict rests on."""

    outputs: list[OutputParity]
    samples: int
    batches: int
    tolerance: float = DEFAULT_TOLERANCE
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "samples": self.samples, "batches": self.batches,
                "tolerance": self.tolerance, "outputs": [asdict(o) for o in self.outputs]}


def ort_session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """A CPU session over the graph as written: basic optimizations only, so onnxruntime's
    fused kernels do not stand in for the ops the mirror implements."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # failures surface as one-line errors, not logs
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors on load
        text = str(exc).strip().splitlines()
        raise InvalidModelError("onnxruntime cannot load the model: "
                                + (text[0] if text else type(exc).__name__)) from exc


def _run_reference(session: ort.InferenceSession, names: list[str],
                   feeds: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
    """onnxruntime on validated data fails mostly on sizes only the graph constrains (a
    Reshape that needs a particular resolution): a data problem, reported as one."""
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    try:
        return session.run(names, feeds, run_options)
    except Exception as exc:  # onnxruntime's exception types are not importable API
        text = str(exc).strip().splitlines()
        raise InvalidDataError(f"{where}: onnxruntime cannot run the model on it: "
                               + (text[0] if text else type(exc).__name__)) from exc


def check_reference_runs(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                         where: str) -> None:
    """onnxruntime must run ``model`` on one batch of the data before anything else does.

    Why: the mirror and the Hessian code assume a model that runs; when the reference runtime
    itself refuses (a weight rewired to an activation, shapes only the graph constrains),
    that is bad input and gets a one-line error, while a failure that only the mirror shows
    stays what it is, a bug."""
    from hawq_onnx.calibration.session import make_session, run_session, session_options

    session = make_session(model, session_options(threads=1, level="basic"))
    run_session(session, None, feeds, where)


def check_parity(
    model: onnx.ModelProto,
    dataset: Dataset,
    batch_size: int = 32,
    device: str = "cpu",
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int = 0,
) -> ParityReport:
    """Run the Mirror and onnxruntime on the same batches and compare every output."""
    from hawq_onnx.mirror import Mirror  # heavy import; only parity checks need it

    session = ort_session(model, threads)
    names = [o.name for o in session.get_outputs()]
    results = [OutputParity(name) for name in names]
    slices = dataset.batch_slices(batch_size)
    batches: Iterable[dict[str, np.ndarray]] = progress(
        dataset.batches(batch_size), total=len(slices), desc="parity")
    mirror: Mirror | None = None
    for index, feeds in enumerate(batches):
        want = _run_reference(session, names, feeds, f"{dataset.source}: batch {index}")
        # built once onnxruntime has run a batch: the mirror evaluates constant subgraphs
        # when it is built, and a model the reference cannot run is bad input, not a bug
        mirror = mirror or Mirror(model, device=device)
        got = mirror.run_numpy(feeds)
        for result, reference in zip(results, want, strict=True):
            result.update(got[result.name], np.asarray(reference))
    for result in results:
        result.finish(tolerance)
    return ParityReport(results, len(dataset), len(slices), tolerance, list(dataset.notes))


__all__ = ["DEFAULT_TOLERANCE", "OutputParity", "ParityReport", "check_parity", "ort_session"]
