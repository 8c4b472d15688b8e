"""A 2-layer transformer encoder that classifies WordNet noun glosses into 26 lexnames.

Text = the synset's lemmas followed by its gloss ("dog, domestic dog, canis familiaris: a
member of the genus canis ..."), lowercased and split on ``[a-z0-9]+``; the label is the
lexicographer file (noun.animal, noun.artifact, ...). Pads are handled inside the graph:
padded keys get a -1e4 attention bias and the head mean-pools over non-pad positions only,
so the only input is ``tokens`` int64 [N, 32].

Writes three files with the same trained weights, in the shapes different exporters emit:
* transformer_op17.onnx: initializers, LayerNormalization nodes;
* transformer_decomposed_ln_op17.onnx: every LayerNorm as ReduceMean, Sub, Pow, ReduceMean,
  Add, Sqrt, Div, Mul, Add (as tf2onnx emits it);
* transformer_constants_op13.onnx: opset 13 (decomposed LayerNorm, since LayerNormalization
  is opset 17+), every initializer moved into a Constant node (as paddle2onnx/spox emit it).
Also writes text_calib.npz / text_eval.npz.

Run: .venv/bin/python -m models.transformer
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from models import common

SEED = 0
EPOCHS = 5
MAX_LEN = 32
VOCAB_SIZE = 5000  # most frequent training words, plus <pad> and <unk>
PAD, UNK = 0, 1
D_MODEL, HEADS, FF, LAYERS = 64, 4, 256, 2
TEST_FRACTION = 0.1
N_CALIB, N_EVAL = 512, 2000
#: training glosses appended after the 512 calibration samples: the mixed-precision search
#: takes GPTQ's input moments from samples past its analysis and held-out parts (256 each),
#: so no loss is measured on the samples GPTQ fitted (see BENCHMARKS, transformer Spearman).
N_MOMENT_SPARE = 256
DATA_NOUN = Path("/usr/share/wordnet/data.noun")
TOKEN_RE = re.compile(r"[a-z0-9]+")
# lexnames(5WN): lexicographer files 03..28 are the noun files.
LEXNAMES = ["noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
            "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
            "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
            "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
            "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
            "noun.time"]
FIRST_NOUN_LEXFILE = 3
DOC = ("2-layer transformer encoder classifying WordNet 3.0 noun glosses (lemmas + gloss) "
       "into the 26 noun lexicographer files; trained by models/transformer.py. Input: "
       "word ids (see metadata 'vocab'), 0 = <pad>, 1 = <unk>, {max_len} per row.")


def read_glosses() -> tuple[list[str], np.ndarray]:
    """(text, label) for every noun synset in WordNet's data.noun."""
    common.ensure_debian_package("wordnet-base", [DATA_NOUN])
    texts, labels = [], []
    for line in DATA_NOUN.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the license header
        fields, gloss = line.split(" | ", 1)
        parts = fields.split()
        n_words = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        texts.append(", ".join(lemmas) + ": " + gloss.strip())
        labels.append(int(parts[1]) - FIRST_NOUN_LEXFILE)
    return texts, np.asarray(labels, dtype=np.int64)


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def build_vocab(texts: list[str]) -> list[str]:
    """Most frequent training words first (ties alphabetical, so the order is stable)."""
    counts = Counter(word for text in texts for word in tokenize(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ["<pad>", "<unk>"] + [w for w, _ in ranked[:VOCAB_SIZE]]


def encode(texts: list[str], vocab: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(vocab)}
    out = np.full((len(texts), MAX_LEN), PAD, dtype=np.int64)
    for row, text in enumerate(texts):
        ids = [index.get(w, UNK) for w in tokenize(text)][:MAX_LEN]
        out[row, :len(ids)] = ids
    return out


class DecomposedLayerNorm(nn.Module):
    """LayerNorm written out op by op, so the exporter emits the tf2onnx-style pattern."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(-1, keepdim=True)
        var = centered.pow(2).mean(-1, keepdim=True)
        return centered / torch.sqrt(var + self.eps) * self.weight + self.bias


class SelfAttention(nn.Module):
    """Multi-head attention with explicit Q·Kᵀ and attn·V MatMuls (no fused kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D_MODEL, D_MODEL) for _ in range(3))
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.scale = 1.0 / math.sqrt(D_MODEL // HEADS)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], MAX_LEN, HEADS, D_MODEL // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + key_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.transpose(1, 2).reshape(x.shape[0], MAX_LEN, D_MODEL))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = SelfAttention()
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, FF), nn.GELU(), nn.Linear(FF, D_MODEL))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_bias))
        return x + self.drop(self.mlp(self.ln2(x)))


class GlossTransformer(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, D_MODEL)
        self.pos_emb = nn.Embedding(MAX_LEN, D_MODEL)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, len(LEXNAMES))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(MAX_LEN, dtype=torch.int64).expand_as(tokens)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        is_pad = (tokens == PAD).to(torch.float32)
        key_bias = (is_pad * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_bias)
        keep = (1.0 - is_pad)[:, :, None]
        pooled = (self.ln_f(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(pooled)


def decomposed_copy(model: GlossTransformer) -> GlossTransformer:
    """The same weights with every nn.LayerNorm replaced by DecomposedLayerNorm."""
    clone = copy.deepcopy(model)
    for layer in clone.layers:
        layer.ln1, layer.ln2 = DecomposedLayerNorm(layer.ln1), DecomposedLayerNorm(layer.ln2)
    clone.ln_f = DecomposedLayerNorm(clone.ln_f)
    return clone


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node at the top of the graph, keeping its
    tensor name as the node's output name."""
    graph = model.graph
    constants = [onnx.helper.make_node("Constant", [], [t.name], name=f"Constant_{t.name}",
                                       value=t) for t in graph.initializer]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SEED).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def write_data_files(tokens: np.ndarray, labels: np.ndarray, train: np.ndarray,
                     test: np.ndarray) -> Path:
    rng = np.random.default_rng(SEED + 1)
    calib = np.sort(rng.choice(train, N_CALIB, replace=False))
    evals = np.sort(rng.choice(test, min(N_EVAL, len(test)), replace=False))
    spare = np.sort(rng.choice(np.setdiff1d(train, calib), N_MOMENT_SPARE, replace=False))
    rows = np.concatenate([calib, spare])  # the first N_CALIB rows stay what they were
    common.write_npz(common.MODELS_DIR / "text_calib.npz",
                     {"tokens": tokens[rows], "labels": labels[rows]})
    eval_file = common.MODELS_DIR / "text_eval.npz"
    common.write_npz(eval_file, {"tokens": tokens[evals], "labels": labels[evals]})
    return eval_file


def metadata(vocab: list[str]) -> dict[str, str]:
    return {"class_names": common.json_list(LEXNAMES),
            "dataset": "WordNet 3.0 data.noun (Debian wordnet-base); label = lexicographer file",
            "tokenizer": f"lowercase, regex {TOKEN_RE.pattern}, truncate/pad to {MAX_LEN}",
            "pad_id": str(PAD), "unk_id": str(UNK), "max_len": str(MAX_LEN),
            "vocab": common.json_list(vocab)}


def export_variants(model: GlossTransformer, vocab: list[str], eval_file: Path,
                    torch_acc: float) -> None:
    with np.load(eval_file) as data:
        tokens = data["tokens"]
    example = torch.from_numpy(tokens[:2])
    decomposed = decomposed_copy(model).eval()
    variants = [("transformer_op17.onnx", model, 17, False),
                ("transformer_decomposed_ln_op17.onnx", decomposed, 17, False),
                ("transformer_constants_op13.onnx", decomposed, 13, True)]
    doc = DOC.format(max_len=MAX_LEN)
    for name, torch_model, opset, as_constants in variants:
        onnx_model = common.export_torchscript(torch_model, example, opset=opset,
                                               input_name="tokens")
        if as_constants:
            onnx_model = initializers_to_constants(onnx_model)
        onnx_model = common.finalize(onnx_model, opset=opset, doc=doc, metadata=metadata(vocab))
        common.check_parity(onnx_model, model, tokens)
        path = common.MODELS_DIR / name
        digest = common.save_model(onnx_model, path)
        common.report(path, digest, common.ort_accuracy(path, eval_file), torch_acc)


def main() -> None:
    common.seed_everything(SEED)
    texts, labels = read_glosses()
    train, test = split_indices(len(texts))
    vocab = build_vocab([texts[i] for i in train])
    tokens = encode(texts, vocab)
    eval_file = write_data_files(tokens, labels, train, test)
    model = GlossTransformer(len(vocab))
    print(f"transformer: training on {len(train)} glosses, vocab {len(vocab)}", flush=True)
    common.train_classifier(model, torch.from_numpy(tokens[train]),
                            torch.from_numpy(labels[train]), epochs=EPOCHS, batch_size=128,
                            lr=2e-3, weight_decay=1e-2, seed=SEED)
    with np.load(eval_file) as data:
        x_eval, y_eval = torch.from_numpy(data["tokens"]), torch.from_numpy(data["labels"])
    torch_acc = common.torch_accuracy(model, x_eval, y_eval)
    export_variants(model, vocab, eval_file, torch_acc)


if __name__ == "__main__":
    main()
