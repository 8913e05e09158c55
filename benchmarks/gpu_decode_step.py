"""One decode step of a Llama-3-8B-shaped decoder at equal KV memory: dense vs MoA.

A stand-in for end-to-end decode throughput where no CUDA vLLM can run: the real
kernels and layer shapes, **not** the vLLM engine (no scheduler, no sampling).
Per context L and KV budget (default 40 GiB):

* dense: vLLM's Triton ``unified_attention`` (loaded as ``kernel_decode.py`` loads
  it without a vLLM install) over one paged cache per layer with a shuffled block
  table; batch = the dense requests the budget holds;
* MoA (a 50% and a 25% plan, heterogeneous per KV head, 64 sinks): our kernel in
  the engine's head-class layout (every (layer, KV head) slot its own one-head
  cache in one allocation, each head class its own block table holding only the
  blocks the class keeps, ``span_classes`` arithmetic); batch = the requests the
  budget holds by those held blocks, capped at 256; KV written per head, as the
  engine does.

Every step (RMSNorm, QKV / O / MLP projections with dummy bf16 weights, RoPE, KV
write, attention, LM head) is captured in a CUDA graph and its replays timed.
Reports batch, step time, output tok/s, ratio to dense, KV bytes attention reads
per step and the bandwidth it achieves. Writes
``benchmarks/results/gpu_decode_step_<gpu>.{md,json}``.

``--smoke`` (automatic without CUDA): a tiny configuration under
``TRITON_INTERPRET=1`` that checks the MoA step's attention against the oracle on
the same cache, so this script cannot rot.

    python benchmarks/gpu_decode_step.py --out-dir "$OUT"     # on a GPU, ~5 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

LLAMA3_8B = dict(layers=32, heads=32, kv_heads=8, head_size=128, hidden=4096, mlp=14336,
                 vocab=128256)
SMOKE = dict(layers=2, heads=4, kv_heads=2, head_size=32, hidden=64, mlp=128, vocab=256)


def moa_plan(shape: dict, density: float, context: int, sink: int, seed: int = 0):
    """Heterogeneous per-KV-head plan with ``density`` at every length: a share of
    heads keeps everything (retrieval heads), the rest grow ``beta * N``."""
    from moa_vllm.plan import PLAN_VERSION, ModelFingerprint, Plan, Provenance, now_iso

    full = 0.25 * density  # share of full heads
    beta = (density - full) / (1 - full)
    rng = random.Random(seed)
    rules = [[(context, 0.0) if rng.random() < full else (-sink, round(beta, 4))
              for _ in range(shape["kv_heads"])] for _ in range(shape["layers"])]
    fp = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=shape["layers"],
                          num_attention_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                          head_dim=shape["head_size"], max_position_embeddings=context)
    return Plan(version=PLAN_VERSION, model=fp, sink_tokens=sink, elastic="position",
                min_window=64, max_head_classes=16, rules=rules,
                provenance=Provenance(method="benchmark", created=now_iso(),
                                      details={"density": density}))


@dataclass
class MoaCache:
    """The head-class layout of one batch: one allocation, a one-head cache per
    slot, one block table per class that maps only the blocks the class holds."""

    storage: torch.Tensor  # [pages, 1, block, 2D]
    slot_base: list[list[int]]  # [layer][head] first page of the slot's cache
    slot_blocks: list[int]  # pages per slot cache, per class
    tables: torch.Tensor  # [classes, batch, blocks per request]
    assignment: list[list[int]]
    pages_per_request: int


def held_block_ids(head_class, context: int, block: int) -> list[int]:
    """Block indices of a request the class still holds for the query at
    ``context - 1`` (the engine frees on the processed tokens)."""
    first, last = head_class.dead_blocks(context - 1, context, block)
    return [b for b in range(math.ceil(context / block)) if not first <= b < last]


def moa_pages_per_request(classes, context: int, block: int) -> int:
    return sum(len(held_block_ids(c, context, block)) * len(c.kv_heads) for c in classes)


def build_moa_cache(plan, classes, assignment, batch, context, block, head_size, dtype,
                    device, gen) -> MoaCache:
    nblk = math.ceil(context / block)
    held = [held_block_ids(c, context, block) for c in classes]
    per_class = [batch * len(h) for h in held]
    slot_base, base = [[0] * plan.model.num_kv_heads for _ in range(plan.model.num_layers)], 0
    for c in classes:
        for layer, j in c.kv_heads:
            slot_base[layer][j] = base
            base += per_class[c.index]
    storage = torch.empty(base, 1, block, 2 * head_size, dtype=dtype, device=device)
    storage.normal_()
    tables = torch.zeros(len(classes), batch, nblk, dtype=torch.int32)
    for c, ids in zip(classes, held):
        perm = torch.randperm(per_class[c.index], generator=gen).to(torch.int32)
        tables[c.index][:, ids] = perm.view(batch, len(ids))
    return MoaCache(storage, slot_base, per_class, tables.to(device), assignment,
                    moa_pages_per_request(classes, context, block))


class Decoder:
    """Dummy-weight decoder layers and the step that a CUDA graph captures."""

    def __init__(self, shape: dict, batch: int, context: int, dtype, device) -> None:
        self.s, self.batch, self.context = shape, batch, context
        H, Hkv, D, E, M = (shape[k] for k in ("heads", "kv_heads", "head_size", "hidden", "mlp"))
        w = lambda *size: torch.randn(*size, dtype=dtype, device=device) * 0.02  # noqa: E731
        self.wqkv = [w(E, (H + 2 * Hkv) * D) for _ in range(shape["layers"])]
        self.wo = [w(H * D, E) for _ in range(shape["layers"])]
        self.wgu = [w(E, 2 * M) for _ in range(shape["layers"])]
        self.wd = [w(M, E) for _ in range(shape["layers"])]
        self.lm_head = w(E, shape["vocab"])
        self.x = torch.randn(batch, E, dtype=dtype, device=device)
        pos = torch.full((batch,), context - 1, device=device)
        inv = 1.0 / (500000 ** (torch.arange(0, D, 2, device=device).float() / D))
        angles = pos[:, None].float() * inv[None, :]
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.logits = None

    @staticmethod
    def rms(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    def rope(self, t):
        a, b = t[..., ::2], t[..., 1::2]
        c, s = self.cos[:, None], self.sin[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    def step(self, attend) -> None:
        """``attend(layer, q [B, H, D], k, v [B, Hkv, D]) -> [B, H, D]`` writes and reads KV."""
        H, Hkv, D = self.s["heads"], self.s["kv_heads"], self.s["head_size"]
        x = self.x
        for layer in range(self.s["layers"]):
            qkv = self.rms(x) @ self.wqkv[layer]
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = self.rope(q.view(-1, H, D))
            k = self.rope(k.view(-1, Hkv, D))
            o = attend(layer, q, k, v.view(-1, Hkv, D))
            x = x + o.reshape(-1, H * D) @ self.wo[layer]
            gate, up = (self.rms(x) @ self.wgu[layer]).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ self.wd[layer]
        self.logits = self.rms(x) @ self.lm_head


def moa_attention(plan, cache: MoaCache, batch, context, block, scale):
    """The engine's CUDA path: KV written per head into its slot, one launch per layer."""
    from moa_kernels import span_attention_paged

    device = cache.storage.device
    L, Hkv = plan.model.num_layers, plan.model.num_kv_heads
    spans = [plan.layer_spans(layer).to(device) for layer in range(L)]
    offsets = [torch.tensor([(cache.slot_base[layer][j] - cache.slot_base[layer][0])
                             * cache.storage[0].numel() for j in range(Hkv)],
                            dtype=torch.int64, device=device) for layer in range(L)]
    heads_tables = [torch.tensor(cache.assignment[layer], dtype=torch.int32, device=device)
                    for layer in range(L)]
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    last = (context - 1) // block
    write_blocks = [[cache.slot_base[layer][j]
                     + cache.tables[cache.assignment[layer][j], :, last].long()
                     for j in range(Hkv)] for layer in range(L)]
    out_buf = {}

    def attend(layer, q, k, v):
        for j in range(Hkv):  # per-head KV write, as do_kv_cache_update on CUDA
            page = write_blocks[layer][j]
            cache.storage[page, 0, (context - 1) % block] = torch.cat([k[:, j], v[:, j]], -1)
        out = out_buf.setdefault(layer, torch.empty_like(q))
        base = cache.storage[cache.slot_base[layer][0]:]
        span_attention_paged(
            query=q, kv_cache=base, block_table=cache.tables, query_start_loc=qsl,
            seq_lens=seq_lens, alpha=spans[layer].alpha, beta_q=spans[layer].beta_q,
            sink_tokens=plan.sink_tokens, min_window=plan.min_window, elastic_position=True,
            prompt_lens=None, scale=scale, output=out, max_query_len=1, max_seq_len=context,
            head_tables=heads_tables[layer], head_offsets=offsets[layer])
        return out

    return attend


def dense_attention(dense, shape, batch, context, block, scale, dtype, device, gen):
    L, Hkv, D = shape["layers"], shape["kv_heads"], shape["head_size"]
    nblk = math.ceil(context / block)
    caches = [torch.empty(batch * nblk, block, Hkv, 2 * D, dtype=dtype, device=device).normal_()
              for _ in range(L)]
    table = torch.randperm(batch * nblk, generator=gen).to(torch.int32).view(batch, nblk)
    table = table.to(device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    last = table[:, (context - 1) // block].long()
    segs = 16
    pad = 1 << (D - 1).bit_length()
    segm_out = torch.empty(batch, shape["heads"], segs, pad, dtype=torch.float32, device=device)
    segm_max = torch.empty(batch, shape["heads"], segs, dtype=torch.float32, device=device)
    segm_sum = torch.empty_like(segm_max)
    out = torch.empty(batch, shape["heads"], D, dtype=dtype, device=device)

    def attend(layer, q, k, v):
        cache = caches[layer]
        cache[last, (context - 1) % block] = torch.cat([k, v], -1)
        dense(q=q, k=cache[..., :D], v=cache[..., D:], out=out, cu_seqlens_q=qsl,
              max_seqlen_q=1, seqused_k=seq_lens, max_seqlen_k=context, softmax_scale=scale,
              causal=True, window_size=(-1, -1), block_table=table, softcap=0,
              q_descale=None, k_descale=None, v_descale=None,
              seq_threshold_3D=128 // Hkv if batch <= 128 // Hkv else 0,
              num_par_softmax_segments=segs, softmax_segm_output=segm_out,
              softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum)
        return out

    return attend, caches


def read_bytes(plan, batch, context, element) -> int:
    """KV bytes the attention of one step reads (sinks + window per KV head)."""
    from moa_vllm.span_classes import head_density

    D, params = plan.model.head_dim, plan.span_params
    tokens = sum(head_density(a, b, context, params) * context
                 for row in plan.rules for a, b in row)
    return int(batch * tokens * 2 * D * element)


def check_against_oracle(plan, cache: MoaCache, attend, batch, context, block, shape, scale):
    """Layer 0's MoA attention equals the oracle on each head's own cache and table."""
    from moa_vllm.oracle import paged_span_attention_reference

    g = torch.Generator().manual_seed(1)
    H, Hkv, D = shape["heads"], shape["kv_heads"], shape["head_size"]
    q = torch.randn(batch, H, D, generator=g).to(cache.storage.dtype)
    k = torch.randn(batch, Hkv, D, generator=g).to(cache.storage.dtype)
    v = torch.randn(batch, Hkv, D, generator=g).to(cache.storage.dtype)
    got = attend(0, q, k, v).float()
    group = H // Hkv
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    worst = 0.0
    for j in range(Hkv):
        c = cache.assignment[0][j]
        base = cache.slot_base[0][j]
        view = cache.storage[base:base + cache.slot_blocks[c]].float().cpu()
        ref = paged_span_attention_reference(
            q[:, j * group:(j + 1) * group].float().cpu(), view, cache.tables[c].cpu(), qsl,
            seq_lens, plan.layer_spans(0, slice(j, j + 1)), scale)
        worst = max(worst, (got[:, j * group:(j + 1) * group].cpu() - ref).abs().max().item())
    assert worst < 2e-2, f"MoA step attention differs from the oracle by {worst:.3e}"
    return worst


def run(args) -> dict:
    from kernel_decode import bench, load_dense, peak_bandwidth

    from moa_vllm.span_classes import assign_head_classes, cdiv, head_class_assignment

    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    shape = SMOKE if args.smoke else LLAMA3_8B
    block, sink = args.block_size, (16 if args.smoke else 64)
    D, Hkv, L = shape["head_size"], shape["kv_heads"], shape["layers"]
    element = torch.finfo(dtype).bits // 8
    page = block * 2 * D * element  # one KV head, one block
    budget_pages = int(args.kv_gib * 2**30) // page
    dense, dense_src = load_dense(Path(args.vendor), device)
    gen = torch.Generator().manual_seed(0)
    scale = D ** -0.5
    name = torch.cuda.get_device_name() if HAS_CUDA else "cpu (TRITON_INTERPRET=1)"
    peak = peak_bandwidth(name) if HAS_CUDA else None
    rows = []
    for context in args.contexts:
        dense_pages = L * Hkv * cdiv(context, block)
        dense_batch = min(args.max_batch, budget_pages // dense_pages)
        row = {"context": context, "dense": None}
        if dense is not None and dense_batch > 0:
            decoder = Decoder(shape, dense_batch, context, dtype, device)
            attend, caches = dense_attention(dense, shape, dense_batch, context, block, scale,
                                             dtype, device, gen)
            t = bench(lambda: decoder.step(attend), device, graph=HAS_CUDA)
            nbytes = dense_batch * L * Hkv * context * 2 * D * element
            row["dense"] = {"batch": dense_batch, "step_s": t, "tok_s": dense_batch / t,
                            "kv_read_bytes": nbytes, "attn_bandwidth_lower_bound": nbytes / t}
            del decoder, attend, caches
        for density in args.densities:
            plan = moa_plan(shape, density, max(args.contexts), sink)
            assignment = head_class_assignment(plan)
            classes = assign_head_classes(plan)
            per_request = moa_pages_per_request(classes, context, block)
            batch = min(args.max_batch, budget_pages // per_request)
            cache = build_moa_cache(plan, classes, assignment, batch, context, block, D, dtype,
                                    device, gen)
            attend = moa_attention(plan, cache, batch, context, block, scale)
            r = {"batch": batch, "head_classes": len(classes),
                 "kv_fraction_held": per_request / dense_pages}
            if args.smoke:
                r["max_abs_diff_vs_oracle"] = check_against_oracle(
                    plan, cache, attend, batch, context, block, shape, scale)
            decoder = Decoder(shape, batch, context, dtype, device)
            t = bench(lambda: decoder.step(attend), device, graph=HAS_CUDA)
            nbytes = read_bytes(plan, batch, context, element)
            r.update(step_s=t, tok_s=batch / t, kv_read_bytes=nbytes,
                     attn_bandwidth_lower_bound=nbytes / t)
            if row["dense"]:
                r["tok_s_ratio_to_dense"] = r["tok_s"] / row["dense"]["tok_s"]
            row[f"moa{int(density * 100)}"] = r
            del decoder, attend, cache
            if HAS_CUDA:
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    from moa_vllm.evaluation.machine import provenance

    return {"provenance": provenance(), "device": name, "peak_bandwidth": peak, "dense_source": dense_src,
            "kv_budget_gib": args.kv_gib, "shape": shape, "block_size": block,
            "dtype": str(dtype),
            "timing": "CUDA-graph replay of the whole step, do_bench median" if HAS_CUDA
            else "one eager call (interpreter: not a speed)", "rows": rows}


def markdown(result: dict) -> str:
    from moa_vllm.evaluation.machine import provenance_lines

    lines = [f"# One decode step at equal KV memory: {result['device']}", "",
             *provenance_lines(result["provenance"]),
             f"Shape {json.dumps(result['shape'])}, {result['dtype']}, block "
             f"{result['block_size']}, KV budget {result['kv_budget_gib']} GiB, dense: vLLM "
             f"unified_attention ({result['dense_source']}). {result['timing']}. A decode step "
             "built from the real kernels and layer shapes, not the vLLM engine (no scheduler, "
             "no sampling). BW = KV bytes attention reads / whole step time (a lower bound on "
             "attention's bandwidth).", "",
             "| context | method | batch | step ms | tok/s | vs dense | KV read/step GiB | BW TB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for label in ["dense", *sorted(k for k in row if k.startswith("moa"))]:
            r = row[label]
            if not r:
                continue
            ratio = f"{r['tok_s_ratio_to_dense']:.2f}" if "tok_s_ratio_to_dense" in r else "-"
            lines.append(f"| {row['context']} | {label} | {r['batch']} | {r['step_s'] * 1e3:.2f} "
                         f"| {r['tok_s']:.0f} | {ratio} | {r['kv_read_bytes'] / 2**30:.2f} | "
                         f"{r['attn_bandwidth_lower_bound'] / 1e12:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config under the interpreter")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--kv-gib", type=float, default=40.0)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--vendor", default=str(ROOT / ".bench_vendor"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if not HAS_CUDA:
        args.smoke = True
    if args.smoke:
        # 64 one-head pages (fp32, head 32, block 16): two dense requests of 96 tokens
        args.contexts, args.kv_gib, args.max_batch = [96], 64 * 16 * 2 * 32 * 4 / 2**30, 3
    result = run(args)
    tag = args.tag or ("smoke" if args.smoke else
                       result["device"].replace("NVIDIA ", "").split()[0])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_decode_step_{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"gpu_decode_step_{tag}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
