#!/usr/bin/env bash
# The GPU benchmarks in one run: the equal-memory decode step and the kernel
# benchmark (its head-class rows included), written under $OUT (default
# benchmarks/results). For a GPU host with torch and Triton but without vLLM,
# pydantic or a network. Prepare two folders once, on a machine with this
# checkout's .venv and a network, from the repo root, and copy them to the host:
#   mkdir -p .bench_vendor && cp "$(.venv/bin/python -c 'import vllm, os; print(os.path.dirname(vllm.__file__))')"/v1/attention/ops/{triton_unified_attention,triton_attention_helpers}.py .bench_vendor/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# Then, on the GPU host, from the repo root: `bash benchmarks/gpu_session.sh`.
set -euo pipefail
OUT="${OUT:-benchmarks/results}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD:$PWD/triton_kernels"
nvidia-smi -L
python3 benchmarks/gpu_decode_step.py --out-dir "$OUT"
python3 benchmarks/kernel_decode.py --batches 8 32 128 --contexts 16384 32768 --out-dir "$OUT"
