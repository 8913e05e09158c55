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
    # signed per-entry effects from the saved Q, K, V and dO of the profiling pass
    P._STATE.update(mode="profile", qkv={}, dO={})
    try:
        emb = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, use_cache=False, logits_to_keep=len(ids) - prompt_len + 1)
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], torch.tensor(ids[prompt_len:]))
        loss.backward()
        qkv, d_o = dict(P._STATE["qkv"]), dict(P._STATE["dO"])
    finally:
        P._STATE.update(mode=None, qkv={}, dO={})
    base = _loss_with_drop(model, ids, prompt_len, None)
    assert abs(base - float(loss.detach())) < 1e-3
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
