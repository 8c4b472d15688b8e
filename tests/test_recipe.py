"""Recipe files (``--config``), ``--json`` summaries and build provenance in reports."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hawq_onnx import __version__
from hawq_onnx.cli import main
from hawq_onnx.recipe import RecipeError, dump_recipe, read_recipe
from tests.tiny_models import save_data, save_mlp


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    return {"model": save_mlp(tmp_path / "mlp.onnx"), "calib": save_data(tmp_path / "calib.npz"),
            "eval": save_data(tmp_path / "eval.npz", samples=64, seed=2)}


def _recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_recipe_gives_the_same_build_as_the_flags(files: dict[str, Path], tmp_path: Path) -> None:
    """Every kind of option (positional, required, choice, float, flag, store_false, append)
    from the recipe: same bytes, same resolved options as the equivalent command line."""
    flags = ["--weight-bits", "4", "--act-bits", "8", "--calib-method", "percentile",
             "--percentile", "99.9", "--per-tensor", "--no-bias-correction",
             "--exclude", "fc2", "--max-calib-samples", "16"]
    assert main(["quantize", str(files["model"]), "-o", str(tmp_path / "a.onnx"), "--calib",
                 str(files["calib"]), "--report", str(tmp_path / "a.json"), *flags]) == 0
    recipe = _recipe(tmp_path / "recipe.toml", """
model = "mlp.onnx"
output = "b.onnx"
calib = "calib.npz"
report = "b.json"
weight-bits = 4
act_bits = "8"
calib-method = "percentile"
percentile = 99.9
per_tensor = true
no-bias-correction = true
exclude = ["fc2"]
max_calib_samples = 16
""")
    assert main(["quantize", "--config", str(recipe)]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    a, b = _report(tmp_path / "a.json"), _report(tmp_path / "b.json")
    assert a["options"] == b["options"]
    assert a["options"]["weight_bits"] == 4 and a["options"]["bias_correction"] is False
    assert a["options"]["exclude"] == ["fc2"] and a["options"]["per_tensor"] is True
    skip = {"output", "report", "config"}
    assert {k: v for k, v in a["build"]["recipe"].items() if k not in skip} == \
        {k: v for k, v in b["build"]["recipe"].items() if k not in skip}
    assert b["build"]["recipe_file"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()


def test_command_line_flags_override_the_recipe(files: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _recipe(tmp_path / "r.toml", """
weight_bits = 4
exclude = ["fc1"]
[quantize]
calib = "calib.npz"
max-calib-samples = 8
[analyze]
max-probes = "not even checked when quantizing"
""")
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "mlp.onnx", "-o", "q.onnx", "--config", "r.toml",
                 "--weight-bits", "8", "--exclude", "fc2", "--report", "r.json"]) == 0
    options = _report(tmp_path / "r.json")["options"]
    assert options["weight_bits"] == 8  # flag beats recipe
    assert options["exclude"] == ["fc2"]  # a repeated flag replaces the recipe's list
    assert options["max_calib_samples"] == 8  # from the [quantize] table


def test_relative_paths_are_relative_to_the_recipe(files: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path / "r.toml", 'model = "mlp.onnx"\noutput = "out/q.onnx"\n'
                     'calib = "calib.npz"\nmax_calib_samples = 8\n')
    (tmp_path / "out").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["quantize", "--config", str(recipe)]) == 0
    assert (tmp_path / "out" / "q.onnx").is_file() and list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(("text", "message"), [
    ("weight_bits = 4\nbogus_option = 1\n", "'bogus_option': unknown option for 'hawq-onnx "
                                            "quantize'"),
    ("weight_bits = 9\n", "'weight_bits' = 9: invalid choice 9"),
    ("weight_bits = true\n", "'weight_bits' = True: expected a value, got true/false"),
    ("per_tensor = 3\n", "'per_tensor' = 3: expected true or false, got 3"),
    ("max_calib_samples = -5\n", "must be a positive integer"),
    ("act_bits = [8]\n", "expected a single value, got a list"),
    ("config = 'other.toml'\n", "'config': recipes do not nest"),
    ("weight_bits = [\n", "not valid TOML"),
    ("quantize = 3\n", "'quantize' must be a table"),
])
def test_bad_recipes_are_one_line_errors(files: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], text: str,
                                         message: str) -> None:
    recipe = _recipe(tmp_path / "bad.toml", text)
    code = main(["quantize", str(files["model"]), "-o", str(tmp_path / "q.onnx"),
                 "--config", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hawq-onnx: error: ")
    assert str(recipe) in err and message in err
    assert not (tmp_path / "q.onnx").exists()


def test_missing_recipe_file_and_abbreviated_option(files: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(files["model"]), "-o", str(tmp_path / "q.onnx"),
                 "--conf", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err == f"hawq-onnx: error: {tmp_path / 'nope.toml'}: no such recipe file\n"


def test_without_tomllib_or_tomli_the_error_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path / "r.toml", "weight_bits = 4\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(RecipeError, match="Python >= 3.11 .* or the 'tomli' package"):
        read_recipe(recipe)


def test_report_records_resolved_recipe_hashes_and_versions(files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    assert main(["quantize", str(files["model"]), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(files["calib"]), "--eval", str(files["eval"]), "--max-calib-samples", "8",
                 "--report", str(report_path)]) == 0
    build = _report(report_path)["build"]
    assert build["command"] == "quantize" and build["version"] == __version__
    assert set(build["versions"]) >= {"hawq-onnx", "python", "onnx", "onnxruntime", "numpy"}
    for key in ("model", "calib", "eval"):
        assert build["inputs"][key] == {
            "path": str(files[key]),
            "sha256": hashlib.sha256(files[key].read_bytes()).hexdigest()}
    recipe = build["recipe"]
    assert recipe["weight_bits"] == 8 and recipe["max_calib_samples"] == 8
    assert recipe["group_size"] is None and "verbose" not in recipe and "json" not in recipe


def test_resolved_recipe_round_trips_to_the_same_model(files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """The report's recipe is itself a recipe: rebuilding from it gives the same bytes."""
    assert main(["quantize", str(files["model"]), "-o", str(tmp_path / "a.onnx"), "--calib",
                 str(files["calib"]), "--weight-bits", "6", "--symmetric-activations",
                 "--max-calib-samples", "8", "--report", str(tmp_path / "a.json")]) == 0
    recipe = dict(_report(tmp_path / "a.json")["build"]["recipe"])
    recipe["output"] = str(tmp_path / "b.onnx")
    del recipe["report"]
    text = dump_recipe(recipe, "quantize")
    path = _recipe(tmp_path / "resolved.toml", text)
    assert read_recipe(path)["quantize"]["weight_bits"] == 6
    assert main(["quantize", "--config", str(path)]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_validate_and_analyze_take_recipes(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(files["model"]), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(files["calib"]), "--max-calib-samples", "8"]) == 0
    recipe = _recipe(tmp_path / "pipeline.toml", """
[validate]
float_model = "mlp.onnx"
quant_model = "q.onnx"
eval = "eval.npz"
latency-runs = 0
max-drop = 1.0
[analyze]
model = "mlp.onnx"
calib = "calib.npz"
min_probes = 2
max_probes = 4
no-cache = true
""")
    capsys.readouterr()
    assert main(["validate", "--config", str(recipe), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exit_code"] == 0 and summary["result"]["samples"] == 64
    assert summary["result"]["build"]["recipe"]["max_drop"] == 1.0
    assert main(["analyze", "--config", str(recipe), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert [layer["name"] for layer in result["layers"]] == ["w1", "w2"]
    assert 2 <= result["probes"] <= 4


def test_json_summary_replaces_text_and_carries_errors(files: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(files["model"]), "-o", str(out), "--calib",
                 str(files["calib"]), "--max-calib-samples", "8", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # nothing but the JSON object on stdout
    assert summary["command"] == "quantize" and summary["exit_code"] == 0
    assert summary["error"] is None and summary["result"]["bytes_quant"] == out.stat().st_size
    assert [row["name"] for row in summary["result"]["layers"]] == ["w1", "w2"]
    code = main(["quantize", str(files["model"]), "-o", str(tmp_path / "x.onnx"), "--calib",
                 str(files["model"]), "--json"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 2 and summary["exit_code"] == 2 and summary["result"] is None
    assert "not a readable .npz archive" in summary["error"]
    assert captured.err.count("\n") == 1 and summary["error"] in captured.err


def test_gate_failure_json_keeps_the_metrics(files: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """validate --max-drop 0 on a 2-bit model: exit 1, the JSON still holds the numbers."""
    assert main(["quantize", str(files["model"]), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(files["calib"]), "--weight-bits", "2", "--max-calib-samples", "8"]) == 0
    capsys.readouterr()
    with np.load(files["eval"]) as data:  # no labels: the drop is 1 - top-1 agreement
        np.savez(tmp_path / "unlabeled.npz", x=data["x"])
    code = main(["validate", str(files["model"]), str(tmp_path / "q.onnx"), "--eval",
                 str(tmp_path / "unlabeled.npz"), "--max-drop", "0", "--latency-runs", "0",
                 "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["exit_code"] == 1
    assert summary["result"]["passed"] is False and summary["result"]["drop"] > 0
    assert "exceeds --max-drop" in summary["error"]
