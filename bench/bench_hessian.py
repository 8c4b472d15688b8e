"""Benchmark of the Hessian engine (not part of the test suite).

All figures side by side, in one run, on the zoo's largest CNN (fashion_cnn_op17, 98k
weights) and the transformer (transformer_op17):

1. time per Hutchinson probe ÷ time of one gradient over the same data, per HVP mode
   (goal ≤ 2.5);
2. all-layer traces from one global HVP per probe vs a per-layer loop (one HVP per layer
   and probe): speed-up per probe, goal ≥ 0.8 × number of layers;
3. double backprop vs forward-over-reverse (and Gauss–Newton): time and peak memory, each
   mode measured in a fresh process;
4. the PyHessian algorithm, written below as a plain reference on an equivalent native
   ``torch.nn.Module`` (same weights, data and Rademacher probes), vs the engine on the
   mirror: per-layer traces must agree within SE, the engine must not be slower than 1.1×.

Run: .venv/bin/python bench/bench_hessian.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hawq_onnx.analysis import AnalysisSettings, _load_inputs, _weight_layers  # noqa: E402
from hawq_onnx.hessian.blocks import rademacher  # noqa: E402
from hawq_onnx.hessian.hutchinson import global_probe_sampler, per_layer_sampler  # noqa: E402
from hawq_onnx.hessian.hvp import HessianVectorProduct  # noqa: E402
from hawq_onnx.hessian.objective import Objective  # noqa: E402
from hawq_onnx.mirror import Mirror  # noqa: E402

MODELS = REPO / "models"
CASES = {"cnn": ("fashion_cnn_op17.onnx", "fashion_calib.npz"),
         "transformer": ("transformer_op17.onnx", "text_calib.npz")}
# ":loop" = the same mode with vmap over the chunk's probes switched off.
MODES = {"kl": ["double_backprop", "forward_over_reverse", "forward_over_reverse:loop",
                "gauss_newton", "gauss_newton:loop"],
         "ce": ["double_backprop", "forward_over_reverse", "forward_over_reverse:loop"]}


def make_hvp(objective: Objective, spec: str) -> HessianVectorProduct:
    mode, _, variant = spec.partition(":")
    hvp = HessianVectorProduct(objective, mode)
    hvp.vectorize = variant != "loop"
    return hvp


# ---------------------------------------------------------------------- set-up
@dataclass
class Setup:
    name: str
    model: onnx.ModelProto
    objective: Objective
    layers: int
    params: int


def build(case: str, loss: str, samples: int, batch: int, device: str) -> Setup:
    model_file, data_file = CASES[case]
    settings = AnalysisSettings(loss=loss, batch_size=batch, max_samples=samples,
                                labels_key="labels" if loss == "ce" else None)
    inputs = _load_inputs(MODELS / model_file, MODELS / data_file, settings)
    layers = _weight_layers(inputs)
    mirror = Mirror(inputs.model, weight_names=[layer.weight for layer in layers],
                    device=device)
    objective = Objective(mirror, inputs.batches, inputs.labels, loss)
    return Setup(case, inputs.model, objective, len(layers),
                 sum(int(layer.params) for layer in layers))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()  # warm-up (allocator, lazy imports, kernels)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------- figures 1 and 2
def probe_costs(setup: Setup, modes: Sequence[str], probes: int, repeats: int,
                device: str) -> dict[str, Any]:
    """Figure 1 per mode; figure 2 (global vs per-layer loop) for the default mode."""
    objective = setup.objective
    grad_hvp = HessianVectorProduct(objective, modes[0])
    gradient = median_time(grad_hvp.gradient, repeats, device)
    active = np.ones(setup.layers, dtype=bool)
    rows = {}
    for mode in modes:
        hvp = make_hvp(objective, mode)
        sample = global_probe_sampler(hvp, torch.Generator().manual_seed(0))
        per_probe = median_time(lambda s=sample: s(probes, active), repeats, device) / probes
        rows[mode] = {"per_probe_s": per_probe, "ratio_to_gradient": per_probe / gradient,
                      "vmapped": hvp.vectorize}
    default = HessianVectorProduct(objective)
    batched = per_layer_sampler(default, torch.Generator().manual_seed(0))
    glob = global_probe_sampler(default, torch.Generator().manual_seed(0))
    naive = naive_loop_sampler(default, torch.Generator().manual_seed(0))
    # the same chunk of probes for the global and the batched per-layer mode; the naive
    # loop costs the same per probe whatever the count, so fewer probes suffice there
    glob_time = median_time(lambda: glob(probes, active), repeats, device) / probes
    batched_time = median_time(lambda: batched(probes, active), repeats, device) / probes
    k = max(1, probes // 4)
    naive_time = median_time(lambda: naive(k), repeats, device) / k
    return {"gradient_s": gradient, "modes": rows, "default_mode": default.mode,
            "global_vs_loop": {"mode": default.mode, "global_per_probe_s": glob_time,
                               "loop_per_probe_s": naive_time,
                               "speedup": naive_time / glob_time,
                               "batched_loop_per_probe_s": batched_time,
                               "batched_speedup": batched_time / glob_time,
                               "goal": 0.8 * setup.layers}}


def naive_loop_sampler(hvp: HessianVectorProduct,
                       generator: torch.Generator) -> Callable[[int], np.ndarray]:
    """The plain per-layer loop: for each probe and layer, one HVP of its own (its own
    passes over the data) on that layer's block."""

    def sample(k: int) -> np.ndarray:
        rows = np.zeros((k, len(hvp.layout)))
        for j in range(k):
            for b, shape in enumerate(hvp.layout.shapes):
                z = rademacher(generator, shape, hvp.dtype, hvp.device)
                (hz,) = hvp.apply([{b: z}], outputs=[[b]])
                rows[j, b] = float((z * hz[b]).sum())
        return rows

    return sample


# ---------------------------------------------------------------------- figure 3 (memory)
def peak_memory(case: str, loss: str, mode: str, probes: int, samples: int, batch: int,
                device: str) -> dict[str, float]:
    """Run one workload in a fresh process (``mode`` or "gradient") and read its peak."""
    command = [sys.executable, __file__, "--memory-child", case, loss, mode, str(probes),
               str(samples), str(batch), device, str(torch.get_num_threads())]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(case: str, loss: str, mode: str, probes: int, samples: int, batch: int,
                 device: str) -> None:
    """Peak memory above the set-up: CUDA allocator peak, or on the CPU the resident set
    sampled every 0.5 ms (after returning the set-up's free heap to the OS)."""
    setup = build(case, loss, samples, batch, device)
    if mode == "gradient":
        def work() -> Any:
            return HessianVectorProduct(setup.objective).gradient()
    else:
        hvp = make_hvp(setup.objective, mode)
        sample = global_probe_sampler(hvp, torch.Generator().manual_seed(0))

        def work() -> Any:
            return sample(probes, np.ones(setup.layers, dtype=bool))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _rss()
        with _RssSampler() as sampler:
            work()
        peak = sampler.peak - base
    print(json.dumps({"peak_mib": peak / 2**20}))


def _rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


class _RssSampler:
    """Tracks the highest resident set size while the block runs."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


# ---------------------------------------------------------------------- figure 4 (PyHessian)
def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


class NativeCNN(nn.Module):
    """fashion_cnn_op17 as plain torch: 3× (Conv+bias, ReLU, MaxPool), 576-128-10 MLP (the
    exporter fused BatchNorm into the convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(576, 128), nn.ReLU(),
                                        nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def load_onnx(self, model: onnx.ModelProto) -> list[nn.Parameter]:
        """Copy Conv/Gemm weights and biases in graph order; returns the weights."""
        values = _initializers(model)
        nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
        modules = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for node, module in zip(nodes, modules, strict=True):
            weight = values[node.input[1]]
            transposed = node.op_type == "Gemm" and not _attr(node, "transB", 0)
            module.weight.data = torch.from_numpy((weight.T if transposed else weight).copy())
            module.bias.data = torch.from_numpy(values[node.input[2]].copy())
        return [m.weight for m in modules]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def native_transformer(model: onnx.ModelProto) -> tuple[nn.Module, list[nn.Parameter]]:
    """models.transformer.GlossTransformer with the ONNX weights: MatMul weights are the
    transposed Linear weights, found through the bias Add that follows them."""
    from models.transformer import GlossTransformer

    values = _initializers(model)
    vocab = next(v.shape[0] for k, v in values.items() if k.endswith("tok_emb.weight"))
    native = GlossTransformer(vocab).eval()
    state = native.state_dict()
    for key in state:
        if key in values:
            state[key] = torch.from_numpy(values[key].copy())
    consumers = {i: n for n in model.graph.node for i in n.input}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in values:
            add = consumers.get(node.output[0])
            bias = next((i for i in add.input if i.endswith(".bias")), None) if add else None
            if bias is None:
                raise RuntimeError(f"cannot map MatMul {node.name} to a Linear layer")
            state[bias[:-len("bias")] + "weight"] = torch.from_numpy(
                values[node.input[1]].T.copy())
    native.load_state_dict(state)
    return native, [p for n, p in native.named_parameters() if _is_weight(n, native)]


def _is_weight(name: str, module: nn.Module) -> bool:
    """Quantizable weights: Linear/Embedding weights (LayerNorm scales and biases stay)."""
    owner = module.get_submodule(name.rsplit(".", 1)[0])
    return name.endswith("weight") and isinstance(owner, (nn.Linear, nn.Embedding))


def pyhessian_traces(model: nn.Module, weights: list[nn.Parameter],
                     batches: list[tuple[torch.Tensor, torch.Tensor]],
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     probes: list[list[torch.Tensor]]) -> np.ndarray:
    """PyHessian's dataloader Hutchinson, as published: per probe and batch, a forward, a
    backward with ``create_graph=True`` and one HVP; HVPs summed weighted by batch size."""
    total = sum(len(x) for x, _ in batches)
    rows = []
    for v in probes:
        hv = [torch.zeros_like(w) for w in weights]
        for x, target in batches:
            model.zero_grad()
            loss = loss_fn(model(x), target)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            products = torch.autograd.grad(grads, weights, grad_outputs=v)
            for acc, p in zip(hv, products, strict=True):
                acc.add_(p, alpha=len(x) / total)
        rows.append([float((a * b).sum()) for a, b in zip(v, hv, strict=True)])
    return np.array(rows)


def pyhessian_stop(samples: np.ndarray, tol: float = 1e-3) -> int:
    """Where PyHessian's rule (relative change of the running mean of the total < tol)
    would have stopped."""
    totals = samples.sum(axis=1)
    means = np.cumsum(totals) / np.arange(1, len(totals) + 1)
    for i in range(1, len(means)):
        if abs(means[i] - means[i - 1]) / (abs(means[i - 1]) + 1e-6) < tol:
            return i + 1
    return len(means)


def versus_pyhessian(setup: Setup, probes: int, repeats: int, device: str) -> dict[str, Any]:
    objective = setup.objective
    if setup.name == "cnn":
        native: nn.Module = NativeCNN()
        weights = native.load_onnx(setup.model)  # type: ignore[operator]
    else:
        native, weights = native_transformer(setup.model)
    native = native.to(device).eval()
    for p in native.parameters():
        p.requires_grad_(any(p is w for w in weights))
    weights = [w for w in native.parameters() if w.requires_grad]
    batches = [(b.feeds[objective.mirror.input_names[0]].to(device), b.labels.to(device))
               for b in objective.batches]
    with torch.no_grad():  # the native module computes what the mirror computes
        gap = max(float((native(x) - objective.mirror(x)[0]).abs().max()) for x, _ in batches)
    hvp = HessianVectorProduct(objective)
    matches = _match_order(hvp, weights)
    order = [block for block, _ in matches]
    probe_vectors = _probes(hvp, probes, device)
    loss_fn = nn.CrossEntropyLoss()
    native_probes = [[z[b].t().contiguous() if flip else z[b] for b, flip in matches]
                     for z in probe_vectors]

    def reference() -> np.ndarray:
        return pyhessian_traces(native, weights, batches, loss_fn, native_probes)

    def engine() -> np.ndarray:
        sample = global_probe_sampler(hvp, torch.Generator().manual_seed(0))
        return sample(probes, np.ones(setup.layers, dtype=bool))

    ref_time = median_time(reference, repeats, device) / probes
    eng_time = median_time(engine, repeats, device) / probes
    ref, eng = reference(), engine()
    ref = ref[:, [order.index(b) for b in range(setup.layers)]]  # back to mirror order
    ref_mean, eng_mean = ref.mean(0), eng.mean(0)
    se = eng.std(0, ddof=1) / math.sqrt(probes)
    stop = pyhessian_stop(ref)
    return {"mode": hvp.mode, "probes": probes, "output_gap": gap,
            "reference_per_probe_s": ref_time, "engine_per_probe_s": eng_time,
            "engine_over_reference": eng_time / ref_time,
            "max_gap_in_se": float(np.max(np.abs(ref_mean - eng_mean) / se)),
            "max_rel_gap": float(np.max(np.abs(ref_mean - eng_mean) / np.abs(eng_mean))),
            "pyhessian_rule_stops_at": stop,
            "pyhessian_rule_error_vs_engine": float(
                abs(ref[:stop].sum(1).mean() - eng.sum(1).mean()) / abs(eng.sum(1).mean()))}


def _match_order(hvp: HessianVectorProduct,
                 weights: list[nn.Parameter]) -> list[tuple[int, bool]]:
    """For each native weight, the mirror block holding the same values, and whether it
    holds them transposed (a Linear's weight is the transposed MatMul initializer)."""
    matches = []
    for w in weights:
        found = [(b, flip) for b, p in enumerate(hvp.params) for flip in (False, True)
                 if (not flip or p.dim() == 2) and _same(p.t() if flip else p, w)]
        if len(found) != 1:
            raise RuntimeError(f"no unique mirror weight for a native weight of {w.shape}")
        matches.append(found[0])
    if sorted(b for b, _ in matches) != list(range(len(hvp.params))):
        raise RuntimeError("native weights do not cover the mirror's")
    return matches


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())


def _probes(hvp: HessianVectorProduct, count: int, device: str) -> list[dict[int, torch.Tensor]]:
    """The engine's probes, drawn exactly as ``global_probe_sampler`` draws them."""
    generator = torch.Generator().manual_seed(0)
    return [{b: rademacher(generator, hvp.layout.shapes[b], hvp.dtype, device)
             for b in range(len(hvp.layout))} for _ in range(count)]


# ---------------------------------------------------------------------- report
def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for loss in ("kl", "ce"):
        setup = build(case, loss, args.samples, args.batch_size, args.device)
        out.setdefault("layers", setup.layers)
        out.setdefault("params", setup.params)
        costs = probe_costs(setup, MODES[loss], args.probes, args.repeats, args.device)
        memory = {mode: peak_memory(case, loss, mode, args.probes, args.samples,
                                    args.batch_size, args.device)
                  for mode in ["gradient", *MODES[loss]]}
        out[loss] = {"costs": costs, "memory": memory}
        if loss == "ce":
            out[loss]["pyhessian"] = versus_pyhessian(setup, args.pyhessian_probes,
                                                      args.repeats, args.device)
        print(f"[{case} {loss}] done", file=sys.stderr, flush=True)
    return out


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"device {args.device}, {args.samples} samples in batches of {args.batch_size}, "
             f"{args.probes} probes per measurement, median of {args.repeats}; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}",
             "", "| model | loss | HVP mode | s / probe | ÷ gradient | peak MiB (gradient) |",
             "|---|---|---|---|---|---|"]
    for case, res in results.items():
        for loss in ("kl", "ce"):
            costs, memory = res[loss]["costs"], res[loss]["memory"]
            for mode, row in costs["modes"].items():
                lines.append(f"| {case} | {loss} | {mode} | {row['per_probe_s']:.4f} | "
                             f"{row['ratio_to_gradient']:.2f} | {memory[mode]['peak_mib']:.0f} "
                             f"({memory['gradient']['peak_mib']:.0f}) |")
    lines += ["", "| model | loss | layers | mode | global s / probe | per-layer loop s / probe "
              "| speed-up (goal 0.8 × layers) | engine's batched per-layer mode s / probe |",
              "|---|---|---|---|---|---|---|---|"]
    for case, res in results.items():
        for loss in ("kl", "ce"):
            g = res[loss]["costs"]["global_vs_loop"]
            lines.append(f"| {case} | {loss} | {res['layers']} | {g['mode']} | "
                         f"{g['global_per_probe_s']:.4f} | {g['loop_per_probe_s']:.4f} | "
                         f"{g['speedup']:.1f}× ({g['goal']:.1f}×) | "
                         f"{g['batched_loop_per_probe_s']:.4f} ({g['batched_speedup']:.1f}×) |")
    lines += ["", "| model | engine mode | probes | PyHessian ref s / probe | engine s / probe "
              "| engine ÷ ref | max gap (SE) | PyHessian rule stops at | its error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case, res in results.items():
        p = res["ce"]["pyhessian"]
        lines.append(f"| {case} | {p['mode']} | {p['probes']} | "
                     f"{p['reference_per_probe_s']:.4f} | {p['engine_per_probe_s']:.4f} | "
                     f"{p['engine_over_reference']:.2f} | {p['max_gap_in_se']:.2g} | "
                     f"{p['pyhessian_rule_stops_at']} | "
                     f"{100 * p['pyhessian_rule_error_vs_engine']:.1f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--memory-child":
        case, loss, mode, probes, samples, batch, device, threads = argv[1:9]
        torch.set_num_threads(int(threads))
        memory_child(case, loss, mode, int(probes), int(samples), int(batch), device)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="cnn,transformer")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--pyhessian-probes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        results[case] = run_case(case, args)
        if args.json:  # after each case, so a later failure keeps what was measured
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                             "results": results}, indent=2))
    print(render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
