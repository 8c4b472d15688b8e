"""Pretrained models from other exporters, never seen while building the mirror.

The models ship inside PyPI wheels that ``make test`` downloads into ``.cache/wheels``
(magika: tf2onnx; rapidocr: paddle2onnx at opsets 11/12 with Constant-node weights; silero-vad:
torch and spox exports with If branches and LSTMs). Each is imported through the normal entry
point (opset upgrade, constant lifting, BN folding) and the mirror must match onnxruntime on the
original file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hawq_onnx.importer import load_model
from hawq_onnx.mirror import Mirror
from hawq_onnx.model_io import save_model
from tests.conftest import WHEELS

Feeds = dict[str, np.ndarray]


def _audio(batch: int, samples: int, sr: int | None) -> Callable[[np.random.Generator], Feeds]:
    def make(rng: np.random.Generator) -> Feeds:
        feeds = {"input": (0.1 * rng.standard_normal((batch, samples))).astype(np.float32),
                 "state": (0.1 * rng.standard_normal((2, batch, 128))).astype(np.float32)}
        if sr is not None:
            feeds["sr"] = np.array(sr, dtype=np.int64)
        return feeds
    return make


def _image(shape: tuple[int, ...]) -> Callable[[np.random.Generator], Feeds]:
    return lambda rng: {"x": rng.uniform(-1, 1, shape).astype(np.float32)}


def _document(rng: np.random.Generator) -> Feeds:
    """Dark glyph-like strokes on white, normalized as PaddleOCR does: on random noise the
    text detector's probabilities all sit near 0 and a relative error means nothing."""
    page = np.full((64, 96), 255.0)
    for row in range(8, 56, 16):
        col = 4
        while col < 88:
            width = int(rng.integers(2, 6))
            page[row:row + 8, col:col + width] = 20.0
            col += width + int(rng.integers(1, 4))
    x = ((page / 255 - 0.5) / 0.5).astype(np.float32)
    return {"x": np.repeat(x[None, None], 3, axis=1)}


def _file_bytes(rng: np.random.Generator) -> Feeds:
    return {"bytes": rng.integers(0, 257, (2, 2048)).astype(np.int32)}


def _sequence(rng: np.random.Generator) -> Feeds:
    return {"input": (0.1 * rng.standard_normal((3, 576))).astype(np.float32),
            "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}


# Foreign graphs run 60+ convolutions whose float32 summation order differs from onnxruntime's
# kernels; the tolerance is the one `hawq-onnx inspect --check` gates on.
TOLERANCE = 1e-4

# (wheel prefix, member inside the wheel, input builder)
WILD = [
    ("magika-", "magika/models/standard_v3_3/model.onnx", _file_bytes),
    ("rapidocr_onnxruntime-", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
     _image((2, 3, 48, 192))),
    ("rapidocr_onnxruntime-", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
     _document),
    ("rapidocr_onnxruntime-", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
     _image((1, 3, 48, 160))),
    ("silero_vad-", "silero_vad/data/silero_vad.onnx", _audio(1, 512, 16000)),
    ("silero_vad-", "silero_vad/data/silero_vad.onnx", _audio(1, 256, 8000)),
    ("silero_vad-", "silero_vad/data/silero_vad_16k_op15.onnx", _audio(2, 512, 16000)),
    ("silero_vad-", "silero_vad/data/silero_vad_half.onnx", _audio(1, 512, None)),
    ("silero_vad-", "silero_vad/data/silero_vad_op18_ifless.onnx", _audio(1, 512, 16000)),
    ("silero_vad-", "silero_vad/data/silero_vad_openvino_16k.onnx", _audio(1, 576, None)),
    ("silero_vad-", "silero_vad/data/silero_vad_16k_sequence.onnx", _sequence),
]


@pytest.fixture(scope="session")
def wild_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Extract every wild model once; the wheels must be there (``make test`` fetches them)."""
    out = tmp_path_factory.mktemp("wild")
    for prefix in sorted({w[0] for w in WILD}):
        wheels = sorted(WHEELS.glob(f"{prefix}*.whl"))
        assert wheels, f"missing {prefix}*.whl in {WHEELS}: run `make setup-test`"
        with zipfile.ZipFile(wheels[0]) as archive:
            for member in {w[1] for w in WILD if w[0] == prefix}:
                target = out / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    return out


def _onnxruntime(path: Path, feeds: Feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _relative_error(have: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(have - want)) / max(float(np.max(np.abs(want))), 1e-6))


@pytest.mark.parametrize(("prefix", "member", "make_feeds"), WILD,
                         ids=[f"{Path(w[1]).stem}-{i}" for i, w in enumerate(WILD)])
def test_mirror_matches_onnxruntime_on_foreign_exports(wild_dir: Path, prefix: str, member: str,
                                                       make_feeds) -> None:
    path = wild_dir / member
    feeds = make_feeds(np.random.default_rng(0))
    expected = _onnxruntime(path, feeds)
    imported = load_model(path)
    mirror = Mirror(imported.model)
    got = mirror.run_numpy(feeds)
    for name, want in zip(mirror.output_names, expected, strict=True):
        assert got[name].shape == want.shape, name
        error = _relative_error(got[name], want)
        assert error <= TOLERANCE, (name, error)


def test_paddle_constant_weights_become_quantizable_layers(wild_dir: Path) -> None:
    """paddle2onnx stores weights as Constant nodes at opset 11: after import they are
    initializers, the opset is 13, and BatchNormalization after Conv is folded."""
    original = onnx.load(wild_dir / WILD[1][1])
    imported = load_model(wild_dir / WILD[1][1])
    model = imported.model
    assert [o.version for o in original.opset_import if o.domain in ("", "ai.onnx")] == [11]
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert not any(n.op_type == "Constant" and n.output[0] in {i.name for i in model.graph.input}
                   for n in model.graph.node)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    initializers = {t.name for t in model.graph.initializer}
    assert conv_weights and conv_weights <= initializers
    original_bn = sum(n.op_type == "BatchNormalization" for n in original.graph.node)
    remaining_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert original_bn == 35 and remaining_bn < original_bn
    mirror = Mirror(model)
    assert len(mirror.weights) >= 50


def test_ocr_character_dictionary_survives_import_and_save(wild_dir: Path, tmp_path: Path) -> None:
    """The recognizer carries its character dictionary in metadata_props."""
    source = wild_dir / WILD[3][1]
    original = {p.key: p.value for p in onnx.load(source).metadata_props}
    assert original, "expected the OCR dictionary in metadata_props"
    target = tmp_path / "rec.onnx"
    save_model(load_model(source).model, target)
    saved = onnx.load(target)
    assert {p.key: p.value for p in saved.metadata_props} == original
    assert saved.ir_version <= 10
    ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])


class _DynamoNet(torch.nn.Module):
    """Conv → LayerNorm → GELU → multi-head attention → Linear, as torch users write it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        tokens = torch.nn.functional.gelu(self.norm(tokens))
        tokens, _ = self.attention(tokens, tokens, tokens)
        return self.head(tokens.mean(1))


def test_torch_dynamo_export_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _DynamoNet().eval()
    example = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(net, (example,), dynamo=True,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "dynamo.onnx"
    program.save(str(path))
    model = load_model(path).model
    mirror = Mirror(model)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    (want,) = _onnxruntime(path, {mirror.input_names[0]: x})
    have = mirror.run_numpy({mirror.input_names[0]: x})[mirror.output_names[0]]
    assert _relative_error(have, want) <= TOLERANCE
    np.testing.assert_allclose(have, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4,
                               atol=1e-5)
    assert len(mirror.weights) >= 4  # conv, attention in/out projections, head
