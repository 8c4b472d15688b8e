# Two commands for users: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Real third-party ONNX models (tf2onnx, paddle2onnx, spox, torch exporters) ship inside
# these wheels; tests read the .onnx files straight out of the downloaded wheels.
WILD_WHEELS ?= magika==1.0.3 silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4
WHEEL_DIR := .cache/wheels
DEMO_MODEL ?= models/fashion_cnn_op17.onnx
DEMO_DATA ?= models/fashion_eval.npz

.PHONY: demo test setup setup-test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

$(WHEEL_DIR)/.done: Makefile | $(PY)
	mkdir -p $(WHEEL_DIR)
	$(PIP) download -q --no-deps -d $(WHEEL_DIR) $(WILD_WHEELS)
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test $(WHEEL_DIR)/.done

demo: setup
	$(VENV)/bin/hawq-onnx inspect $(DEMO_MODEL) --check $(DEMO_DATA)

test: setup-test
	$(VENV)/bin/ruff check hawq_onnx passes tests models bench
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check hawq_onnx passes tests models bench

clean:
	rm -rf $(VENV) .cache build *.egg-info
