"""Speculative decoding: greedy == greedy generate, the sampled distribution == generate's (chi-square, with a
negative control), rollback == decoding the accepted prefix directly, stats, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmx.decoding.speculative as spec
from lmx.decoding import Sampler, SelfDraft, cost, generate, speculative_generate
from lmx.decoding.sampling import process_logits
from lmx.models import init_state
from lmx.models import select as select_
from lmx.models import truncate as truncate_
from lmx.models.mamba3 import current_state as mamba3_current
from lmx.models.ssm import conv_window, current_state
from tests.tiny import HYBRID_2X2

PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 53, 58, 97], [42]]  # unequal lengths
NEW = 10


def perturbed(params, scale: float, seed: int = 1):
    """A draft that agrees with the target often but not always: its weights plus noise."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + scale * np.std(a) * rng.standard_normal(a.shape).astype(a.dtype), params)


HYBRID = {"hybrid-tiny": HYBRID_2X2}


def assert_same_tokens(a, b):
    np.testing.assert_array_equal(a.tokens_BRT, b.tokens_BRT)
    np.testing.assert_array_equal(a.lengths_BR, b.lengths_BR)
    np.testing.assert_array_equal(a.finished_BR, b.finished_BR)
    np.testing.assert_allclose(a.logprobs_BRT, b.logprobs_BRT, atol=1e-4)


@pytest.mark.parametrize("target_name, draft, gamma", [
    ("llama-tiny", "perturbed", 1),
    ("llama-tiny", "perturbed", 4),
    ("mamba2-tiny", "llama-tiny", 4),  # a draft of another architecture: nearly every token rejected
    ("mamba2-tiny", "perturbed", 3),  # SSM target and draft: rejections after accepted blocks
    ("hybrid-tiny", SelfDraft(2), 4),  # the target's first 2 layers (Mamba-2 + attention), see HYBRID
])
def test_greedy_equals_greedy_generate(tiny, target_name, draft, gamma):
    target, params = tiny(target_name, **HYBRID.get(target_name, {}))
    mixed = draft == "perturbed"
    if mixed:
        draft = (target, perturbed(params, 0.3))
    elif isinstance(draft, str):
        draft = tiny(draft)
    want = generate(target, params, PROMPTS, max_new_tokens=NEW)
    got = speculative_generate(target, params, PROMPTS, draft=draft, gamma=gamma, max_new_tokens=NEW)
    assert_same_tokens(got, want)
    s = {k: float(v) for k, v in got.stats.items()}
    assert s["overflow"] == 0 and s["tokens_generated"] == 3 * NEW
    assert s["accepted_tokens"] <= s["verified_tokens"] <= s["draft_tokens"]
    assert s["target_calls"] == 1 + s["rounds"] and s["model_calls"] == s["target_calls"]
    assert s["flops"] == pytest.approx(s["target_flops"] + s["draft_flops"])
    tcfg = target.cfg
    n = getattr(draft, "num_layers", 0)  # each call reads its model's weights once (a self-draft: its layers +
    dcfg = tcfg.replace(num_layers=n, layer_pattern=tcfg.layer_pattern[:n]) if n else draft[0].cfg  # embed + head)
    assert s["weight_bytes_read"] == pytest.approx(cost.weight_bytes(tcfg) * s["target_calls"]
                                                   + cost.weight_bytes(dcfg) * s["draft_calls"])
    assert s["bytes_moved"] == pytest.approx(s["weight_bytes_read"] + s["state_bytes_read"])
    # At least every position the output needed was read once by the target (verification re-reads more).
    assert s["state_bytes_read"] >= float(want.stats["state_bytes_read"]) * (1 - 1e-6)
    if mixed:
        assert 0 < s["acceptance_rate"] < 1  # the round structure is exercised: accepts and rejections both


def test_stop_token_inside_an_accepted_block(tiny):
    """The target as its own draft accepts every token (α = 1, γ + 1 tokens per call); a stop token in the middle
    of a block ends the row there, exactly as generate ends it."""
    target, params = tiny("llama-tiny")
    free = np.asarray(generate(target, params, PROMPTS, max_new_tokens=NEW).tokens_BRT[:, 0])
    stops = {int(free[0, 2]), int(free[1, 5])}
    want = generate(target, params, PROMPTS, max_new_tokens=NEW, stop_tokens=stops)
    got = speculative_generate(target, params, PROMPTS, draft=(target, params), gamma=4, max_new_tokens=NEW,
                               stop_tokens=stops)
    assert_same_tokens(got, want)
    assert got.finished_BR[0, 0] and int(got.lengths_BR[0, 0]) <= 3
    assert float(got.stats["acceptance_rate"]) == 1.0
    full = speculative_generate(target, params, PROMPTS, draft=(target, params), gamma=4, max_new_tokens=NEW)
    assert float(full.stats["tokens_per_target_call"]) == 5.0  # every verification yields γ + 1 tokens


def test_adaptive_draft_length_is_exact_and_adapts(tiny):
    target, params = tiny("llama-tiny")
    want = generate(target, params, PROMPTS, max_new_tokens=NEW)
    bad = speculative_generate(target, params, PROMPTS, draft=tiny("llama3-tiny"), gamma=6, adaptive=True,
                               max_new_tokens=NEW)
    assert_same_tokens(bad, want)
    # A draft that is always rejected is cut to γ_r = 1 after the first round: far fewer drafted tokens.
    fixed = speculative_generate(target, params, PROMPTS, draft=tiny("llama3-tiny"), gamma=6, max_new_tokens=NEW)
    assert int(bad.stats["draft_tokens"]) < int(fixed.stats["draft_tokens"]) / 2


# ------------------------------------------------------------------------------------------------------------
# Distribution: the first three sampled tokens of many rows of one prompt, against the exact joint distribution of
# generate's sampler, computed from teacher-forced logits.

V_SMALL, ROWS, PROMPT = 8, 6000, [3, 1, 4]


def exact_joint(model, params, sampler, n_tokens=3):
    """P(t_1 .. t_n) under `sampler` applied to the model's logits: [V] * n, float64."""
    seqs = np.array(np.meshgrid(*[np.arange(V_SMALL)] * (n_tokens - 1), indexing="ij")).reshape(n_tokens - 1, -1).T
    tokens = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], 1).astype(np.int32)
    logits = model.apply({"params": params}, jnp.asarray(tokens)).logits_BTV[:, len(PROMPT) - 1:]
    probs = np.asarray(jax.nn.softmax(process_logits(sampler, logits.reshape(-1, V_SMALL))), np.float64).reshape(
        len(seqs), n_tokens, V_SMALL)
    joint = np.ones([V_SMALL] * n_tokens)
    for i in range(n_tokens):
        # probs[s, i] conditions on the first i tokens of continuation s (its later tokens do not matter).
        cond = probs[:, i].reshape([V_SMALL] * (n_tokens - 1) + [V_SMALL])
        cond = cond[(slice(None),) * i + (0,) * (n_tokens - 1 - i)]
        joint = joint * cond.reshape([V_SMALL] * (i + 1) + [1] * (n_tokens - 1 - i))
    return joint


def chi2_accepts(counts, probs, n) -> bool:
    """Chi-square goodness of fit at level 1e-4 (cells expected < 5 pooled); a count where p = 0 rejects."""
    counts, probs = counts.ravel(), probs.ravel()
    if counts[probs == 0].sum() > 0:
        return False
    e = probs * n
    small = (e < 5) & (probs > 0)
    c = np.append(counts[e >= 5], counts[small].sum())
    e = np.append(e[e >= 5], e[small].sum())
    c, e = c[e > 0], e[e > 0]
    chi2, df = ((c - e) ** 2 / e).sum(), len(e) - 1
    z = 3.72  # Wilson-Hilferty approximation of the chi-square 1 - 1e-4 quantile
    return chi2 < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def small_vocab(tiny):
    target, params = tiny("llama-tiny", vocab_size=V_SMALL)
    return target, params, perturbed(params, 1.5, seed=2)


def draw_counts(small_vocab, sampler, seed=0):
    target, params, draft_params = small_vocab
    g = speculative_generate(target, params, [PROMPT], draft=(target, draft_params), gamma=2, sampler=sampler,
                             rng=jax.random.key(seed), num_samples=ROWS, max_new_tokens=3)
    tokens = np.asarray(g.tokens_BRT[0])
    counts = np.zeros([V_SMALL] * 3)
    np.add.at(counts, tuple(tokens.T), 1)
    return counts, g.stats


@pytest.mark.parametrize("sampler", [Sampler(temperature=1.3), Sampler(top_k=3), Sampler(top_p=0.8)],
                         ids=["temperature", "top_k", "top_p"])
def test_sampled_tokens_follow_generates_distribution(small_vocab, sampler):
    counts, stats = draw_counts(small_vocab, sampler)
    assert 0.2 < float(stats["acceptance_rate"]) < 0.95  # drafts are both accepted and rejected
    assert chi2_accepts(counts, exact_joint(small_vocab[0], small_vocab[1], sampler), ROWS)


def test_distribution_test_rejects_a_variant_without_the_residual_correction(small_vocab, monkeypatch):
    """Negative control: after a rejection the variant samples from p itself instead of norm(max(0, p − q)); the
    same test must reject it."""
    sampler = Sampler(temperature=1.3)
    monkeypatch.setattr(spec, "_RESIDUAL_CORRECTION", False)
    spec._compiled.cache_clear()
    try:
        counts, _ = draw_counts(small_vocab, sampler)
    finally:
        spec._compiled.cache_clear()
    assert not chi2_accepts(counts, exact_joint(small_vocab[0], small_vocab[1], sampler), ROWS)


# ------------------------------------------------------------------------------------------------------------
# Rollback: what a round leaves equals decoding the accepted prefix directly.


def valid_view(state, cfg):
    """Each layer's state at each row's length: KV slots below it, SSM current state (and conv window)."""
    lengths_B = state.lengths_B
    out = []
    for kind, layer in zip(cfg.layer_pattern, state.layers, strict=True):
        if kind == "attn":
            S = layer.v_BKSH.shape[2]
            live_S = np.arange(S)[None] < np.asarray(lengths_B)[:, None]
            out.append(np.where(live_S[:, None, :, None], np.asarray(layer.v_BKSH), 0))
            out.append(np.where(live_S[:, None, None, :], np.asarray(layer.k_BKHS), 0))
        elif cfg.ssm.variant == "mamba3":
            out.extend(np.asarray(a) for a in jax.tree.leaves(mamba3_current(layer.rings, lengths_B)))
        else:
            out.append(np.asarray(current_state(layer.ssm_BQNHZ, lengths_B)))
            out.append(np.asarray(conv_window(layer.conv_BWY, lengths_B, cfg.ssm.conv_width - 1)))
    return out


@pytest.mark.parametrize("name", ["hybrid-tiny", "mamba3-tiny"])
def test_rollback_after_rejection_equals_decoding_the_prefix(tiny, name):
    model, params = tiny(name, **HYBRID.get(name, {}))
    cfg = model.cfg
    apply = jax.jit(model.apply)
    truncate, select = jax.jit(truncate_), jax.jit(select_)  # one program each, not op by op
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 12)), jnp.int32)
    state = truncate(apply({"params": params}, tokens[:, :6], state=init_state(cfg, 2, 16)).state,
                     jnp.asarray([6, 4]))
    # A round: four one-token draft steps (the draft side), or one 5-token verification (the target side), then
    # back to the accepted prefix: rows keep 2 and 1 of the new tokens.
    new = lambda b: tokens[b, 6:11] if b == 0 else tokens[b, 4:9]
    block = jnp.stack([new(0), new(1)])
    stepped = state
    for i in range(4):
        stepped = apply({"params": params}, block[:, i:i + 1], state=stepped).state
    verified = apply({"params": params}, block, state=state).state
    accepted = [2, 1]
    keep = state.lengths_B + jnp.asarray(accepted)
    # Each row's accepted prefix decoded directly, alone (no rollback).
    want = []
    for b, k in enumerate(accepted):
        direct = select(state, jnp.asarray([b]))
        for i in range(k):
            direct = apply({"params": params}, block[b:b + 1, i:i + 1], state=direct).state
        want.append(direct)
    for rolled in (truncate(stepped, keep), truncate(verified, keep)):
        assert rolled.lengths_B.tolist() == keep.tolist()
        for b, direct in enumerate(want):
            row = select(rolled, jnp.asarray([b]))
            for x, y in zip(valid_view(row, cfg), valid_view(direct, cfg), strict=True):
                np.testing.assert_allclose(x, y, atol=1e-5)
            # ... and the next token's logits agree.
            nxt = jnp.asarray([[7]], jnp.int32)
            np.testing.assert_allclose(apply({"params": params}, nxt, state=row).logits_BTV,
                                       apply({"params": params}, nxt, state=direct).logits_BTV, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------


def test_bad_input_fails_early_naming_the_values(tiny):
    target, params = tiny("llama-tiny")
    kw = dict(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"draft's vocab_size=8 differs from the target's vocab_size=128"):
        speculative_generate(target, params, PROMPTS, draft=tiny("llama-tiny", vocab_size=8), **kw)
    with pytest.raises(ValueError, match=r"gamma=0 must be an int >= 1"):
        speculative_generate(target, params, PROMPTS, draft=(target, params), gamma=0, **kw)
    for E in (0, 2, 5):
        with pytest.raises(ValueError, match=rf"SelfDraft\(num_layers={E}\) must lie in \[1, 2\)"):
            speculative_generate(target, params, PROMPTS, draft=SelfDraft(E), **kw)
    ssm, ssm_params = tiny("mamba2-tiny")  # rollback_window 4
    with pytest.raises(ValueError, match=r"rollback_window=4 steps, fewer than gamma=6"):
        speculative_generate(target, params, PROMPTS, draft=(ssm, ssm_params), gamma=6, **kw)
    with pytest.raises(ValueError, match=r"the self-draft's SSM layers keep rollback_window=4 steps, fewer than "
                                         r"gamma=5"):
        speculative_generate(ssm, ssm_params, PROMPTS, draft=SelfDraft(1), gamma=5, **kw)
    with pytest.raises(TypeError, match=r"draft must be \(draft_model, draft_params\)"):
        speculative_generate(target, params, PROMPTS, draft=target, **kw)
