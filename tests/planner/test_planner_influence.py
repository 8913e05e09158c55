"""The influence formula against finite differences on the tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moa_vllm.planner import profile as P


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return P.load_model(tiny_dir, threads=2)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    # a trained model: the random tiny one is too far from linear for full drops
    return P.load_model(smollm2_dir, threads=2)


def _sample(tok, n=48, answer=8):
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 5000, size=n).tolist()
    return ids, n - answer


def layer_inputs(model, ids, prompt_len, block=16):
    """What the profiling pass hands each layer's tile effects: ``(q, k, v, scale)`` and
    dO per layer (``"loss"``: the sample's answer loss)."""
    qkv, d_o = {}, {}
    effects = P._layer_effects

    def keep(layer, grad):
        qkv[layer], d_o[layer] = P._STATE["qkv"][layer], grad
        effects(layer, grad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_layer_effects", keep)
        _, qkv["loss"] = P.profile_sample(model, ids, prompt_len, block, len(ids))
    return qkv, d_o


_DROP: dict = {}


def _drop_attention(module, query, key, value, attention_mask, scaling=None, **kw):
    """Exact attention with one entry (layer, query head, i, j) masked, row renormalised."""
    q, k, v = query[0], key[0], value[0]
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    t = q.shape[1]
    s = (q.double() @ k.double().transpose(1, 2)) * scaling
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None].repeat(q.shape[0], 1, 1)
    s = s.masked_fill(~mask, -math.inf)
    if _DROP and _DROP["layer"] == module.layer_idx:
        # keep a fraction (1 - eps) of the entry's weight; eps = 1 masks it
        eps = _DROP.get("eps", 1.0)
        s[_DROP["head"], _DROP["i"], _DROP["j"]] += math.log1p(-eps) if eps < 1 else -math.inf
    a = torch.softmax(s, -1)
    return (a @ v.double()).float()[None].transpose(1, 2).contiguous(), None


def _loss_with_drop(model, ids, prompt_len, drop):
    from transformers import AttentionInterface

    AttentionInterface.register("drop_one", _drop_attention)
    model.config._attn_implementation = "drop_one"
    _DROP.clear()
    _DROP.update(drop or {})
    try:
        with torch.no_grad():
            return float(P.answer_loss(model, ids, prompt_len).double())
    finally:
        model.config._attn_implementation = P.ATTN_NAME
        _DROP.clear()


def test_effect_matches_finite_difference(smol):
    model, tok = smol
    text = ("The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, "
            "and the fox runs back into the forest where it lives with its family.")
    ids = tok(text)["input_ids"][:40]
    prompt_len = len(ids) - 8
    # signed per-entry effects from the Q, K, V and dO of the profiling pass
    qkv, d_o = layer_inputs(model, ids, prompt_len)
    base = _loss_with_drop(model, ids, prompt_len, None)
    assert abs(base - qkv["loss"]) < 1e-3
    checked = 0
    for layer in (3, 20):
        q, k, v, scale = qkv[layer]
        g = q.shape[0] // k.shape[0]
        kx, vx = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        t = q.shape[1]
        s = (q @ kx.transpose(1, 2)) * scale
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
        a = torch.softmax(s, -1)
        grad = d_o[layer] @ vx.transpose(1, 2)
        signed = -a * (grad - (grad * a).sum(-1, keepdim=True)) / (1 - a).clamp_min(1e-6)
        # block_effects is |signed effects summed over a tile and the query heads
        # of each KV head| (block 1: one entry; block 4: 4 x 4 tiles)
        hkv = k.shape[0]
        eff = P.block_effects(q, k, v, d_o[layer], scale, block=1)
        ref = signed.view(hkv, g, t, t).sum(1).abs().double()
        torch.testing.assert_close(eff, ref, rtol=1e-4, atol=1e-9)
        eff4 = P.block_effects(q, k, v, d_o[layer], scale, block=4, chunk=16)
        pad = -t % 4
        tiles = torch.nn.functional.pad(signed, (0, pad, 0, pad)).view(
            hkv, g, (t + pad) // 4, 4, (t + pad) // 4, 4)
        ref4 = tiles.sum((1, 3, 5)).abs().double()
        torch.testing.assert_close(eff4, ref4, rtol=1e-4, atol=1e-9)
        # the largest effects against finite differences, among entries where a
        # first-order expansion is meaningful (A not close to 1: removing a
        # dominant entry changes the row completely)
        cand = (signed.abs() * (a < 0.05)).flatten()
        for idx in cand.topk(3).indices.tolist():
            h, rem = divmod(idx, t * t)
            i, j = divmod(rem, t)
            where = {"layer": layer, "head": h, "i": i, "j": j}
            actual = _loss_with_drop(model, ids, prompt_len, where) - base
            pred = float(signed[h, i, j])
            eps = 0.02
            slope = (_loss_with_drop(model, ids, prompt_len, {**where, "eps": eps}) - base) / eps
            print(layer, h, i, j, float(a[h, i, j]), actual, pred, slope)
            # d loss / d eps at eps = 0 is exactly effect * (1 - A): the gradient is right
            assert slope == pytest.approx(pred * (1 - float(a[h, i, j])), rel=0.1, abs=5e-4)
            # masking the entry entirely: the first-order prediction holds roughly
            # (the random model is far from linear, hence the loose tolerance)
            assert actual == pytest.approx(pred, rel=0.5, abs=2e-4), (layer, h, i, j, actual, pred)
            checked += 1
    assert checked == 6


def test_block_sums_and_causality(tiny):
    model, tok = tiny
    ids, prompt_len = _sample(tok, n=100, answer=10)
    imp, loss = P.profile_sample(model, ids, prompt_len, block=16, length=128)
    assert imp.shape == (4, 2, 8, 8)
    assert np.isfinite(imp).all() and (imp >= 0).all()
    assert np.allclose(np.triu(imp, k=1), 0)  # no effect above the diagonal
    assert imp[:, :, 7, :].sum() == 0  # rows past the sample's 100 tokens
    # a coarse tile is the signed sum of its fine tiles: never more than their
    # absolute sum, and less where their effects cancel
    fine, _ = P.profile_sample(model, ids, prompt_len, block=4, length=128)
    coarse = fine.reshape(4, 2, 8, 4, 8, 4).sum(axis=(3, 5))
    assert (imp <= coarse * (1 + 1e-6) + 1e-12).all()
    assert (imp < coarse * 0.99).any()


def _reference_layer_inputs(model, ids, prompt_len):
    """The profiling pass before per-layer recompute: one backward through the whole
    model, every layer's Q, K, V and dO held until it ends."""
    from transformers import AttentionInterface

    held: dict = {}

    def attention(module, query, key, value, attention_mask, scaling=None, **kw):
        g = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), is_causal=True,
            scale=scaling)
        layer = module.layer_idx
        held[layer] = [query.detach()[0], key.detach()[0], value.detach()[0], scaling]
        out.register_hook(lambda grad: held[layer].append(grad.detach()[0]))
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("moa_reference", attention)
    model.config._attn_implementation = "moa_reference"
    try:
        with torch.enable_grad():
            emb = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, use_cache=False, logits_to_keep=len(ids) - prompt_len + 1)
            torch.nn.functional.cross_entropy(out.logits[0, :-1],
                                              torch.tensor(ids[prompt_len:])).backward()
    finally:
        model.config._attn_implementation = P.ATTN_NAME
    return held


def _tiles(x, hkv, block):
    """``[H, T, T]`` -> the sum over each KV head's query heads and each tile."""
    h, t, _ = x.shape
    pad = -t % block
    x = torch.nn.functional.pad(x, (0, pad, 0, pad))
    return x.view(hkv, h // hkv, (t + pad) // block, block, (t + pad) // block, block).sum((1, 3, 5))


def _effects_and_fp32_bound(q, k, v, d_o, scale, block):
    """Tile effects in float64 on whole ``T x T`` matrices, and a first-order bound of
    the rounding error of the same formula evaluated in fp32 in any summation order
    (dot products of D terms, row sums of T, tile sums of ``group x block^2``; unit
    roundoff u, gamma_n = n u / (1 - n u)), from the inputs' magnitudes alone."""
    u = 2.0 ** -24

    def gamma(n):
        return n * u / (1 - n * u)

    q, k, v, d_o = (x.double() for x in (q, k, v, d_o))
    h, t, d = q.shape
    hkv = k.shape[0]
    k, v = k.repeat_interleave(h // hkv, 0), v.repeat_interleave(h // hkv, 0)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    a = torch.softmax((q @ k.transpose(1, 2) * scale).masked_fill(~causal, -math.inf), -1)
    g = d_o @ v.transpose(1, 2)
    row = (g * a).sum(-1, keepdim=True)
    r = a / (1 - a).clamp_min(1e-6)
    eff = r * (g - row)
    d_s = gamma(d + 1) * scale * (q.abs() @ k.abs().transpose(1, 2)) * causal
    rho = 2 * d_s.amax(-1, keepdim=True) + (t + 4) * u  # relative error of a row of A
    d_g = gamma(d) * (d_o.abs() @ v.abs().transpose(1, 2))
    d_row = (d_g * a + g.abs() * a * rho).sum(-1, keepdim=True) + gamma(t + 1) * (g.abs() * a).sum(
        -1, keepdim=True)
    d_eff = eff.abs() * (rho + r * rho + 4 * u) + r * (d_g + d_row + u * (g - row).abs())
    n = h // hkv * block * block
    bound = _tiles(d_eff, hkv, block) + gamma(n) * _tiles(eff.abs(), hkv, block)
    return _tiles(eff, hkv, block).abs(), bound


def test_per_layer_profile_matches_one_backward_within_fp32_rounding(tiny):
    """Recomputing one layer at a time in the backward pass gives the tile effects of
    the whole-model backward (every layer's Q, K, V, dO held), evaluated in float64,
    within the rounding bound of fp32; only the layer being profiled is held."""
    model, tok = tiny
    ids, prompt_len = _sample(tok, n=200, answer=16)
    block = 16
    held_at_effects = []
    effects = P._layer_effects

    def count(layer, grad):
        held_at_effects.append((layer, sorted(P._STATE["qkv"])))
        effects(layer, grad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_layer_effects", count)
        imp, _ = P.profile_sample(model, ids, prompt_len, block, length=256)
    layers = model.config.num_hidden_layers
    # the backward visits the layers last to first, each recomputed just before
    assert held_at_effects == [(layer, [layer]) for layer in reversed(range(layers))]
    reference = _reference_layer_inputs(model, ids, prompt_len)
    for layer in range(layers):
        ref, bound = _effects_and_fp32_bound(*reference[layer][:3], reference[layer][4],
                                             reference[layer][3], block)
        got = torch.from_numpy(imp[layer, :, :ref.shape[1], :ref.shape[1]])
        assert ((got - ref).abs() <= bound).all(), (layer, float(((got - ref).abs() - bound).max()))
        # the bound is loose where A is near 1 (1 - A loses its digits in fp32; this
        # random model's attention is peaked), but under 1% of at least a fifth of
        # the tiles: a wrong layer, head or gradient cannot hide in it
        nonzero = ref > 0
        assert (bound < 1e-2 * ref)[nonzero].double().mean() >= 0.2, layer


def test_bf16_profile_measures_what_fp32_does(smol, smollm2_dir):
    """``--dtype bfloat16`` (an 8B model on one GPU): weights and activations in bf16,
    effects in fp32. On SmolLM2 the answer loss and the tiles track the fp32 profile
    within what bf16's 8-bit mantissa, through 30 layers, allows."""
    model, tok = smol
    half, _ = P.load_model(smollm2_dir, threads=2, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    ids = tok((P.__doc__ or "") * 4)["input_ids"][:256]
    ref, ref_loss = P.profile_sample(model, ids, 224, 16, 256)
    imp, loss = P.profile_sample(half, ids, 224, 16, 256)
    assert loss == pytest.approx(ref_loss, rel=0.02)
    assert np.abs(imp - ref).sum() < 0.15 * np.abs(ref).sum()
    assert np.corrcoef(imp.ravel(), ref.ravel())[0, 1] > 0.99
    assert P.masked_answer_loss(half, None, ids, 224) == pytest.approx(loss, rel=1e-3)
