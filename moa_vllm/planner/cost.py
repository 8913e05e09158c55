"""What a plan search costs, before it runs: peak memory and time from the model's
config, the lengths, the dtype and the device. `plan search` prints it first, so
an 8B search that cannot fit is stopped before its first hour, not after.

Memory is counted tensor by tensor from what profiling holds (``planner.profile``'s
docstring): the weights, every layer's input hidden states (activation
checkpoints), the importance arrays on the host, and the largest of what is alive
one at a time: one layer's recomputed activations with the backward's gradients,
that layer's attention part with one chunk of the tile effects, or the answer's
logits (freed before the backward reaches the layers). Time counts
matrix FLOPs at the device's measured matmul rate, the effects' element-wise
passes and every decode step's read of the weights at its measured memory
bandwidth: a rough figure (within 2-3x), since kernels reach neither rate
everywhere, and a floor on a GPU, where a step's launch latency also counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moa_vllm.planner.profile import EFFECT_CHUNK_ELEMENTS

GIB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """The sizes profiling memory and time depend on."""

    layers: int
    full_layers: int  # the layers MoA searches (a hybrid model windows the others)
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: int
    layer_params: int  # of one decoder layer

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """Parameter counts from the model built on the meta device (no memory)."""
        from transformers import AutoModelForCausalLM

        from moa_vllm.plan import fingerprint_from_hf_config

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layer = model.get_decoder().layers[0]
        fp = fingerprint_from_hf_config(config)
        return cls(
            layers=config.num_hidden_layers, full_layers=len(fp.full_layers),
            hidden=config.hidden_size, heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=fp.head_dim,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
            params=sum(p.numel() for p in model.parameters()),
            layer_params=sum(p.numel() for p in layer.parameters()))


def profile_bytes(shape: ModelShape, length: int, dtype_bytes: int, answer_tokens: int,
                  block: int = 64) -> dict[str, int]:
    """Peak bytes of profiling one sample of ``length`` tokens, by part (their sum)."""
    t, b = length, dtype_bytes
    h, qd, kvd, inter = shape.hidden, shape.heads * shape.head_dim, \
        shape.kv_heads * shape.head_dim, shape.intermediate
    # saved for backward by one recomputed layer: the two RMS norms in fp32 (input and
    # normalised), SDPA's Q, K, V (repeated to every query head) and output; the MLP's
    # gate, up and activation
    attention_part = t * (8 * h + b * 4 * qd)
    layer = attention_part + t * (8 * h + b * 3 * inter)
    backward = t * b * (2 * inter + 2 * h)  # gradients alive while the MLP runs backward
    # the effects of one query chunk: A, G and one temporary in fp32; fp32 K and V
    chunk = max(block, min(256, EFFECT_CHUNK_ELEMENTS // (shape.heads * t)) // block * block)
    effects = 3 * 4 * shape.heads * chunk * t + 4 * 2 * kvd * t
    # the answer's logits in the model's dtype, in fp32, log-softmax and its gradient:
    # freed before the backward reaches the layers
    logits = (answer_tokens + 1) * shape.vocab * (b + 3 * 4)
    nb = -(-t // block)
    return {
        "weights": shape.params * b,
        # every layer's input, the embeddings (a leaf) and their gradient
        "checkpoints": (shape.layers + 2) * t * h * b,
        # per-layer effects, the sample's array and the running sum (float64, host)
        "importance": 3 * shape.full_layers * shape.kv_heads * nb * nb * 8,
        "layer or logits": max(layer + backward, attention_part + effects, logits),
    }


def answer_bytes(shape: ModelShape, length: int, dtype_bytes: int) -> dict[str, int]:
    """Peak bytes of a dense answer (calibration) or a masked answer loss
    (validation) over ``length`` tokens, no gradients: the KV cache, one layer's
    hidden states and MLP, and one 512-query chunk of the masked attention's fp32
    scores and probabilities."""
    t, b = length, dtype_bytes
    return {
        "weights": shape.params * b,
        "kv cache": 2 * shape.layers * shape.kv_heads * shape.head_dim * t * b,
        "layer": t * b * (4 * shape.hidden + 3 * shape.intermediate)
        + 2 * 4 * shape.heads * 512 * t,
    }


def forward_flops(shape: ModelShape, length: int) -> float:
    """Matrix FLOPs of one forward pass over ``length`` tokens (causal attention)."""
    attention = 2 * shape.heads * shape.head_dim * length * length
    return shape.layers * (2 * shape.layer_params * length) + shape.full_layers * attention


def profile_work(shape: ModelShape, length: int) -> tuple[float, float]:
    """Matrix FLOPs and element-wise bytes of profiling one sample: the forward, the
    recompute and the backward (input gradients only: about one more forward of the
    linear layers, 2.5 of attention), and the effects (two ``T x T / 2`` matmuls per
    query head, about ten fp32 passes over the scores)."""
    t = length
    linear = shape.layers * 2 * shape.layer_params * t
    attention = 2 * shape.heads * shape.head_dim * t * t * shape.full_layers
    scores = shape.heads * t * t / 2 * shape.full_layers
    return 3 * linear + 4.5 * attention + attention, 10 * 4 * 2 * scores


@dataclass(frozen=True)
class DeviceRates:
    flops: float  # matmul FLOP/s in the model's dtype
    bytes: float  # element-wise bytes/s

    @classmethod
    def measure(cls, device: str, dtype: torch.dtype, seconds: float = 0.3) -> DeviceRates:
        """A few large matmuls and in-place multiplies on the device."""
        n = 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        x = torch.ones(1 << 24, device=device)

        def rate(op, work) -> float:
            op()
            sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
            sync()
            t0, reps = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds / 2:
                op()
                reps += 1
            sync()
            return work * reps / (time.perf_counter() - t0)

        return cls(rate(lambda: a @ a, 2 * n ** 3), rate(lambda: x.mul_(1.0), 2 * 4 * x.numel()))


@dataclass(frozen=True)
class SearchEstimate:
    peak_bytes: int
    peak_stage: str  # where the peak is: "profiling 4096 tokens", ...
    peak_parts: dict[str, int]
    seconds: dict[str, float]  # per stage
    milp_seconds_at_most: float
    rates: DeviceRates

    def describe(self, device: str, dtype: str) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.peak_parts.items())
        stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in self.seconds.items())
        return (f"estimate on {device} ({dtype}): peak memory {self.peak_bytes / GIB:.2f} GiB "
                f"({self.peak_stage}: {parts}); time about "
                f"{sum(self.seconds.values()) / 60:.0f} min ({stages} min; matmuls at "
                f"{self.rates.flops / 1e9:.0f} GFLOP/s, element-wise "
                f"{self.rates.bytes / 1e9:.0f} GB/s measured here; rough, within 2-3x) "
                f"+ MILP at most {self.milp_seconds_at_most / 60:.0f} min")


def estimate_search(shape: ModelShape, profile: list[int], samples: list[int],
                    validate: list[int], validate_samples: list[int], plans_validated: int,
                    answer_tokens: int, dtype_bytes: int, block: int, milp_solves: int,
                    milp_time_limit: float, rates: DeviceRates,
                    retrieval_prompts: int = 0) -> SearchEstimate:
    """Peak memory (profiling, or an answer at a validation length) and time of
    every stage; ``retrieval_prompts``: recall prompts scored per validation length,
    over every plan (one forward each)."""
    peaks = {f"profiling {t} tokens": profile_bytes(shape, t, dtype_bytes, answer_tokens, block)
             for t in profile}
    peaks.update({f"an answer of {t} tokens": answer_bytes(shape, t, dtype_bytes)
                  for t in validate})
    stage = max(peaks, key=lambda k: sum(peaks[k].values()))

    def secs(flops: float, elementwise: float = 0.0) -> float:
        return flops / rates.flops + elementwise / rates.bytes

    # the dense answers, a token at a time: each step reads every weight
    step = max(secs(2 * shape.params), secs(0, shape.params * dtype_bytes))
    calibration = sum(n * (secs(forward_flops(shape, t)) + answer_tokens * step)
                      for t, n in zip(profile + validate, samples + validate_samples))
    profiling = sum(n * secs(*profile_work(shape, t)) for t, n in zip(profile, samples))
    validation = sum(n * plans_validated * forward_flops(shape, t)
                     for t, n in zip(validate, validate_samples))
    retrieval = sum(retrieval_prompts * forward_flops(shape, t) for t in validate)
    return SearchEstimate(
        peak_bytes=sum(peaks[stage].values()), peak_stage=stage, peak_parts=peaks[stage],
        seconds={"calibration": calibration, "profiling": profiling,
                 "validation": secs(validation), "retrieval": secs(retrieval)},
        milp_seconds_at_most=milp_solves * milp_time_limit, rates=rates)
