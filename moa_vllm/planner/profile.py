"""Attention-influence profiling.

For every layer, query head and attention entry ``(i, j)``, the first-order change
of the answer loss when entry ``(i, j)`` is masked and its row renormalised is

    effect_ij = | A_ij * (G_ij - sum_k G_ik A_ik) / (1 - A_ij) |,   G = dL/dA.

(Masking ``j`` gives ``A'_k = A_k / (1 - A_j)`` for ``k != j``; the first-order loss
change ``sum_k G_k dA_k`` simplifies to ``-A_j (G_j - sum_k G_k A_k) / (1 - A_j)``.)

A span masks whole tiles, for every query head of a KV head at once, so a tile's
importance is the absolute value of its entries' *signed* sum: the first-order
loss change of masking the tile. Summing absolute entries instead counted the
diffuse attention of early layers, whose many small effects cancel when the tile
is masked, as the largest (SmolLM2 at 1k: 54-64% of the long-range importance in
layers 0-11, where full spans change no retrieval, 14-21% in layers 18-23, where
they do).

Memory stays bounded per layer (``planner.cost.profile_bytes`` counts it): the
model runs with a custom attention function (the flash kernel of PyTorch's SDPA,
never an ``L x L`` matrix) and every decoder layer under activation checkpointing,
so the forward keeps only each layer's input hidden states (``layers x T x hidden``
in the model's dtype, on its device) and the answer logits. The backward pass
recomputes one layer at a time; there the attention function keeps that layer's
detached Q, K, V, and the hook on its output's gradient dO turns them into the
layer's tile effects at once and drops them: ``A`` is recomputed in query chunks
(at most ``EFFECT_CHUNK_ELEMENTS`` scores each), ``G = dO @ V^T`` in the same
chunks, and the signed effect is summed over each ``block x block`` tile (causal
part) and the query heads of its KV head, in fp32 whatever the model's dtype.
Only one layer's activations and one chunk of one layer's ``A`` are ever alive.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

_STATE: dict = {"mode": None}

ATTN_NAME = "moa_planner"
# fp32 scores in one chunk of ``block_effects`` (256 MiB each; a few are alive)
EFFECT_CHUNK_ELEMENTS = 1 << 26


def _planner_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query ``[B, H, T, D]``, key/value ``[B, Hkv, T, D]`` -> ``[B, T, H, D]``."""
    mode = _STATE["mode"]
    if mode == "masked":
        return _masked_attention(module, query, key, value, scaling)
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    v = value.repeat_interleave(group, dim=1) if group > 1 else value
    tq, tk = query.shape[2], k.shape[2]
    window = getattr(module, "sliding_window", None)  # a layer the model windows itself
    if tq == tk and window is None:
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
    else:  # cached generation (the queries are the last tq positions) or a window
        keep = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
        if window is not None:
            keep = keep.triu(tk - tq - window + 1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=keep, scale=scaling)
    if mode == "profile" and window is None:  # MoA searches the full-attention layers
        layer = module.layer_idx
        if _STATE["recompute"]:  # the backward pass recomputes this layer: keep its Q, K, V
            _STATE["qkv"][layer] = (
                query.detach()[0],
                key.detach()[0],
                value.detach()[0],
                scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1]),
            )
        elif out.requires_grad:
            out.register_hook(lambda g, layer=layer: _layer_effects(layer, g.detach()[0]))
    return out.transpose(1, 2).contiguous(), None


def _layer_effects(layer: int, d_o: torch.Tensor) -> None:
    """The gradient hook of a layer's attention output: its tile effects, from the
    Q, K, V its recompute kept (dropped here, so one layer's are alive at a time)."""
    if layer not in _STATE["qkv"]:
        raise RuntimeError(f"layer {layer}: the backward pass reached its attention output "
                           "before recomputing the layer (activation checkpointing is off?)")
    q, k, v, scale = _STATE["qkv"].pop(layer)
    _STATE["effects"][layer] = block_effects(q, k, v, d_o, scale, _STATE["block"]).cpu()


@contextmanager
def _layer_checkpoints(model):
    """Every decoder layer under non-reentrant activation checkpointing: the forward
    keeps its inputs only, the backward recomputes it in full (no early stop: the
    recompute must reach the attention), one layer at a time."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    layers = model.get_decoder().layers
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        with set_checkpoint_early_stop(False):
            yield
    finally:
        for layer in layers:
            del layer.forward


def _masked_attention(module, query, key, value, scaling, chunk: int = 512):
    """The exact MoA mask of ``_STATE['plan']`` (fp32, query chunks, keys limited to
    the sinks and the layer's widest window). Fewer queries than keys: the queries
    are the last positions (cached generation)."""
    from moa_vllm.span_mask import elastic_lengths, masked_attention

    q = query[0].float()
    k, v = key[0].float(), value[0].float()
    spans = _STATE["plan"].mask_spans(module.layer_idx)
    spans_here = spans.to(q.device)
    t_len, t_q = k.shape[1], q.shape[1]
    first = t_len - t_q  # position of the first query
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    prompt_len = _STATE.get("prompt_len", t_len)
    for start in range(0, t_q, chunk):
        end = min(t_q, start + chunk)
        q_pos = torch.arange(first + start, first + end, device=q.device)
        n = elastic_lengths(spans, q_pos, prompt_len)
        k_pos = spans.key_positions(first + start, int(n[0]), first + end).to(q.device)
        allowed = spans_here.mask(q_pos, k_pos, n)  # [Hkv, Tq, Tk]
        qc = q[:, start:end].transpose(0, 1)  # [Tq, H, D], as the primitive takes it
        kc, vc = k[:, k_pos].transpose(0, 1), v[:, k_pos].transpose(0, 1)
        out[:, start:end] = masked_attention(qc, kc, vc, allowed, scale).transpose(0, 1)
    return out[None].transpose(1, 2).contiguous().to(query.dtype), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _planner_attention)


def load_model(model_dir, threads: int | None = None, device: str = "cpu",
               dtype: str = "float32"):
    """The HF model with the planner's attention, weights in ``dtype`` on ``device``
    (bf16 on a GPU fits an 8B model; the effects are computed in fp32 either way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    register()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=ATTN_NAME, device_map=device
    ).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def answer_logits(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """The logits that predict the answer tokens ``ids[prompt_len:]``, one forward."""
    n_ans = len(ids) - prompt_len
    out = model(torch.tensor([ids], device=model.device), logits_to_keep=n_ans + 1,
                use_cache=False)
    return out.logits[0, :-1]


def answer_loss(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens ``ids[prompt_len:]``."""
    target = torch.tensor(ids[prompt_len:], device=model.device)
    return F.cross_entropy(answer_logits(model, ids, prompt_len).float(), target)


def block_effects(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_o: torch.Tensor,
    scale: float,
    block: int,
    chunk: int = 256,
) -> torch.Tensor:
    """Tile effects ``[Hkv, nb, nb]`` (float64) of one layer: ``|signed effects summed
    over the tile and the query heads of each KV head|``. q/d_o ``[H, T, D]``, k/v
    ``[Hkv, T, D]``, in any dtype (computed in fp32). Queries go in chunks of
    ``chunk`` tokens, fewer where ``H x chunk x T`` would pass ``EFFECT_CHUNK_ELEMENTS``;
    each KV head's keys serve its query heads without a copy per query head."""
    num_heads, t_len, dim = q.shape
    hkv = k.shape[0]
    group = num_heads // hkv
    nb = -(-t_len // block)
    chunk = max(block, min(chunk, EFFECT_CHUNK_ELEMENTS // (num_heads * t_len)) // block * block)
    k, v = k.float(), v.float()
    out = torch.zeros(hkv, nb, nb, dtype=torch.float64, device=q.device)
    for start in range(0, t_len, chunk):
        end = min(t_len, start + chunk)
        rows = end - start  # causal: no key beyond the chunk's last query
        qc = q[:, start:end].float().reshape(hkv, group * rows, dim)
        s = torch.matmul(qc, k[:, :end].transpose(1, 2)).view(hkv, group, rows, end)
        s.mul_(scale)
        causal = torch.arange(end, device=q.device)[None, :] > torch.arange(
            start, end, device=q.device)[:, None]
        s.masked_fill_(causal, float("-inf"))
        a = torch.softmax(s, dim=-1)
        del s
        dc = d_o[:, start:end].float().reshape(hkv, group * rows, dim)
        g = torch.matmul(dc, v[:, :end].transpose(1, 2)).view(hkv, group, rows, end)
        row = (g * a).sum(-1, keepdim=True)
        eff = g.sub_(row).mul_(a).div_((1.0 - a).clamp_min_(1e-6))
        del a
        # pad to whole tiles; sum each tile and the query heads of each KV head
        pq = -(-rows // block) * block - rows
        pk = -(-end // block) * block - end
        if pq or pk:
            eff = F.pad(eff, (0, pk, 0, pq))
        qb = eff.shape[2] // block
        kb = eff.shape[3] // block
        eff = eff.view(hkv, group, qb, block, kb, block).sum(dim=(1, 3, 5)).abs_()
        out[:, start // block : start // block + qb, :kb] += eff.double()
    return out


def profile_sample(model, ids: list[int], prompt_len: int, block: int, length: int) -> tuple[np.ndarray, float]:
    """Importance ``[layers, Hkv, length/block, length/block]`` of one sample and its
    loss: one forward that keeps each layer's input, one backward that recomputes and
    profiles a layer at a time (module docstring)."""
    cfg = model.config
    nb = -(-length // block)
    _STATE.update(mode="profile", recompute=False, qkv={}, effects={}, block=block)
    try:
        with torch.enable_grad(), _layer_checkpoints(model):
            # Gradients must flow through the activations, not the weights: make
            # the input embeddings a leaf that requires grad.
            ids_t = torch.tensor([ids], device=model.device)
            emb = model.get_input_embeddings()(ids_t).detach().requires_grad_(True)
            n_ans = len(ids) - prompt_len
            out = model(inputs_embeds=emb, logits_to_keep=n_ans + 1, use_cache=False)
            logits = out.logits[0, :-1].float()
            loss = F.cross_entropy(logits, ids_t[0, prompt_len:])
            del out, logits
            _STATE["recompute"] = True
            loss.backward()
        del emb
        imp = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads, nb, nb), dtype=np.float64)
        for layer, eff in _STATE["effects"].items():  # windowed layers stay zero: not searched
            m = eff.shape[1]
            imp[layer, :, :m, :m] = eff.numpy()
        return imp, float(loss.detach())
    finally:
        _STATE.update(mode=None, recompute=False, qkv={}, effects={})


def profile_length(model, samples, length: int, block: int, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Mean importance over the samples of one profiling length."""
    from tqdm import tqdm

    total = None
    losses = []
    for s in tqdm(samples, desc=f"profile {length}", disable=not progress, leave=False):
        imp, loss = profile_sample(model, s.ids, len(s.prompt), block, length)
        total = imp if total is None else total + imp
        losses.append(loss)
    mean = total / len(samples)
    return mean, {
        "samples": len(samples),
        "dense_answer_loss": float(np.mean(losses)),
        "mean_prompt_len": float(np.mean([len(s.prompt) for s in samples])),
        "mean_answer_len": float(np.mean([len(s.answer) for s in samples])),
    }


@contextmanager
def _masked(plan, prompt_len: int):
    """Forwards inside run under the plan's exact mask (``plan=None``: dense)."""
    _STATE.update(mode="masked" if plan is not None else None, plan=plan, prompt_len=prompt_len)
    try:
        yield
    finally:
        _STATE.update(mode=None, plan=None)


@torch.no_grad()
def masked_answer_loss(model, plan, ids: list[int], prompt_len: int) -> float:
    """Answer loss with the plan's exact mask (the HF forward of tests/hf_oracle.py,
    chunked so that no ``L x L`` matrix is built). ``plan=None``: dense."""
    with _masked(plan, prompt_len):
        return float(answer_loss(model, ids, prompt_len))


@torch.no_grad()
def masked_generate(model, tokenizer, plan, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy answer tokens with the plan's exact mask (``N`` = the prompt length in
    prompt-elastic plans), KV-cached. ``plan=None``: dense."""
    eos = tokenizer.eos_token_id
    with _masked(plan, len(ids)):
        out = model.generate(torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                       device=model.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=eos if eos is not None else 0)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def masked_completes(model, tokenizer, plan, prompt: str, answer: str) -> bool:
    """Whether greedy decoding under the plan's exact mask continues ``prompt`` with
    `` answer`` (``plan=None``: dense): one teacher-forced forward, each answer token
    the argmax after the ones before it, which is what greedy generation emits."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with _masked(plan, len(prompt_ids)):
        predicted = answer_logits(model, ids, len(prompt_ids)).argmax(-1).tolist()
    return predicted == ids[len(prompt_ids):]
