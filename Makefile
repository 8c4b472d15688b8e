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
DEMO_CALIB ?= models/fashion_calib.npz
DEMO_EVAL ?= models/fashion_eval.npz
DEMO_OUT ?= build/demo

.PHONY: demo test setup setup-test lint clean check-ort-training report-screenshot

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
	mkdir -p $(DEMO_OUT)
	$(VENV)/bin/hawq-onnx quantize $(DEMO_MODEL) -o $(DEMO_OUT)/model_w8a8.onnx \
		--calib $(DEMO_CALIB) --report $(DEMO_OUT)/quantize.json
	$(VENV)/bin/hawq-onnx validate $(DEMO_MODEL) $(DEMO_OUT)/model_w8a8.onnx \
		--eval $(DEMO_EVAL) --max-drop 0.01 --report $(DEMO_OUT)/validate.json

test: setup-test
	$(VENV)/bin/ruff check hawq_onnx passes tests models bench
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check hawq_onnx passes tests models bench

clean:
	rm -rf $(VENV) .cache build *.egg-info

# Optional: the mirror's weight gradients vs onnxruntime-training's gradient graph. That package
# ships its own `onnxruntime` module, so it lives in a separate venv; the project goes in with
# --no-deps (its dependencies would pull the plain onnxruntime back in). A failed install only
# prints a notice; a gradient mismatch fails.
ORT_VENV ?= .venv-ort-training
ORT_TRAINING_SPEC ?= onnxruntime-training-cpu==1.19.2
ORT_PY := $(ORT_VENV)/bin/python

$(ORT_VENV)/.installed: pyproject.toml
	test -x $(ORT_PY) || $(PYTHON) -m venv $(ORT_VENV)
	$(ORT_PY) -m pip install -q "$(TORCH_SPEC)"
	$(ORT_PY) -m pip install -q "$(ORT_TRAINING_SPEC)" onnx numpy networkx scipy tqdm
	$(ORT_PY) -m pip install -q --no-deps -e .
	$(ORT_PY) -c "import onnxruntime as o, onnxruntime.training; print('onnxruntime', o.__version__)"
	touch $@

check-ort-training:
	@if $(MAKE) --no-print-directory $(ORT_VENV)/.installed; then \
	  $(ORT_PY) tests/ort_training/check_gradients.py; \
	else \
	  echo "NOTICE: installing $(ORT_TRAINING_SPEC) into $(ORT_VENV) failed;" \
	    "the gradient check against onnxruntime-training was skipped."; \
	fi

# The HTML build reports rendered in headless Chromium (Debian: apt-get install chromium);
# look at the PNGs in $(REPORT_DIR). Paths given to chromium must be absolute file:// URLs.
REPORT_DIR ?= .cache/report
CHROMIUM ?= chromium
CHROMIUM_FLAGS := --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --window-size=1200,1600

report-screenshot: setup
	mkdir -p $(REPORT_DIR)
	$(VENV)/bin/hawq-onnx quantize $(DEMO_MODEL) -o $(REPORT_DIR)/quant.onnx \
	  --calib models/fashion_calib.npz --eval $(DEMO_EVAL) --report $(REPORT_DIR)/quantize.json \
	  --report-html $(REPORT_DIR)/quantize.html
	$(VENV)/bin/hawq-onnx quantize $(DEMO_MODEL) -o $(REPORT_DIR)/mixed.onnx \
	  --calib models/fashion_calib.npz --bops-budget 100M --candidate-act-bits 8,16 --analysis-samples 64 \
	  --holdout-samples 64 --max-probes 16 --eval-configs 4 --no-interactions \
	  --cache-dir $(REPORT_DIR)/cache --report-html $(REPORT_DIR)/mixed.html
	$(VENV)/bin/hawq-onnx analyze $(DEMO_MODEL) --calib models/fashion_calib.npz \
	  --max-samples 64 --max-probes 32 --cache-dir $(REPORT_DIR)/cache \
	  --report-html $(REPORT_DIR)/analyze.html
	for page in quantize mixed analyze; do \
	  $(CHROMIUM) $(CHROMIUM_FLAGS) --user-data-dir=$(CURDIR)/$(REPORT_DIR)/chromium-profile \
	    --screenshot=$(CURDIR)/$(REPORT_DIR)/$$page.png \
	    file://$(CURDIR)/$(REPORT_DIR)/$$page.html 2>/dev/null || exit 1; \
	  echo "screenshot: $(REPORT_DIR)/$$page.png"; \
	done
