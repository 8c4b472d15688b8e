"""Shared pieces of the model-zoo scripts: seeding, offline data, training, export, checks.

Why one module: every zoo model must be built the same way (fixed seeds, deterministic
kernels, 2 threads, explicit IR version, full checker, onnxruntime parity with PyTorch,
byte-identical files on a rebuild), so those rules live here once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent
IR_VERSION = 10
THREADS = 2
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
# Fashion-MNIST training-set pixel mean and std (of x / 255); applied in the data files.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def seed_everything(seed: int) -> None:
    """Same seed, same kernels, same thread count: a rebuild gives the same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def ensure_debian_package(package: str, files: Sequence[Path]) -> None:
    """Install ``package`` with apt-get only when one of ``files`` is missing."""
    if all(f.exists() for f in files):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{files[0]} is missing and apt-get is not available; "
                           f"install the Debian package '{package}' first")
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"could not install the Debian package '{package}' ({err}); "
                           f"run 'sudo apt-get install {package}' and retry") from err
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"'{package}' is installed but {missing} are still missing")


def _read_idx(path: Path) -> np.ndarray:
    """A gzip IDX file (the MNIST format): big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as normalized float32 [N,1,28,28] images and int64 labels."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    paths = [FASHION_DIR / n for n in names]
    ensure_debian_package("dataset-fashion-mnist", paths)
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
    return (normalize_fashion(x_train), y_train.astype(np.int64),
            normalize_fashion(x_test), y_test.astype(np.int64))


def normalize_fashion(images: np.ndarray) -> np.ndarray:
    scaled = images.astype(np.float32)[:, None] / np.float32(255.0)
    return (scaled - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                     batch_size: int, lr: float, weight_decay: float = 1e-4, seed: int = 0,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
                     = None) -> None:
    """AdamW with a one-cycle schedule; the shuffling order comes from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = x[idx] if augment is None else augment(x[idx], gen)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}", flush=True)
    model.eval()


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 500) -> float:
    model.eval()
    preds = [model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return float((torch.cat(preds) == y).float().mean())


def export_torchscript(model: nn.Module, example: torch.Tensor, *, opset: int,
                       input_name: str, output_name: str = "logits",
                       dynamic_batch: bool = True, keep_batchnorm: bool = False
                       ) -> onnx.ModelProto:
    """torch's TorchScript exporter (``dynamo=False``): it writes the requested opset
    directly. ``keep_batchnorm`` exports in PRESERVE mode so Conv+BN is not fused."""
    model.eval()
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    axes = {input_name: {0: "N"}, output_name: {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes=axes, training=mode, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def finalize(model: onnx.ModelProto, *, opset: int, doc: str,
             metadata: Mapping[str, str]) -> onnx.ModelProto:
    """Pin IR version, doc string and metadata; prove the opset, checker and shapes hold."""
    model.ir_version = IR_VERSION
    model.doc_string = doc
    if not model.producer_name:
        model.producer_name = "pytorch"
        model.producer_version = torch.__version__.split("+")[0]
    del model.metadata_props[:]
    for key in sorted(metadata):
        model.metadata_props.add(key=key, value=metadata[key])
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if default != [opset]:
        raise RuntimeError(f"expected default opset {opset}, got {default}")
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: Path) -> str:
    """Write the model; return its sha256 so callers can print and compare it."""
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez_compressed`` layout with a fixed zip timestamp, so rebuilds are
    byte-identical (numpy stamps the current time into each member)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())


def ort_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_logits(model: onnx.ModelProto | Path, inputs: np.ndarray,
               batch_size: int = 500) -> np.ndarray:
    """Logits of the first output; a model with a fixed batch dim is fed that many rows."""
    session = ort_session(model)
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
    step = fixed or batch_size
    outs = [session.run(None, {spec.name: inputs[i:i + step]})[0]
            for i in range(0, len(inputs), step)]
    return np.concatenate(outs)


def ort_accuracy(model: onnx.ModelProto | Path, npz_path: Path) -> float:
    """Top-1 accuracy with onnxruntime on a zoo data file (input key = model input name)."""
    session = ort_session(model)
    name = session.get_inputs()[0].name
    with np.load(npz_path) as data:
        inputs, labels = data[name], data["labels"]
    return float((ort_logits(model, inputs).argmax(1) == labels).mean())


def count_params(model: onnx.ModelProto) -> int:
    """Float weight elements, whether stored as initializers or as Constant nodes."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)


def check_parity(model: onnx.ModelProto, torch_model: nn.Module, inputs: np.ndarray,
                 atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| on ``inputs``; raises if above ``atol``."""
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(inputs)).numpy()
    diff = float(np.abs(ort_logits(model, inputs) - expected).max())
    if diff > atol:
        raise RuntimeError(f"onnxruntime differs from PyTorch by {diff:.2e} (> {atol})")
    return diff


def json_list(values: Sequence[str]) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def report(path: Path, digest: str, accuracy: float, torch_acc: float) -> None:
    print(f"  {path.name}: onnxruntime acc {accuracy:.4f} (torch {torch_acc:.4f}) "
          f"sha256 {digest[:16]}", flush=True)
