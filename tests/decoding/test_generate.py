import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.decoding import AllFinished, MOfRFinished, Sampler, generate
from lmx.decoding.generate import PROMPT_BUCKET

PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 53, 58, 97], [42]]
NEW = 8


def trace_count():
    return sys.modules["lmx.decoding.generate"]._trace_count  # the package attribute is the function


def teacher_forced_greedy(model, params, prompts, n_new):
    """Argmax continuation by full forwards (no cache) over the growing, right-padded sequences."""
    lengths = [len(p) for p in prompts]
    seqs = np.zeros((len(prompts), max(lengths) + n_new), np.int32)
    for i, p in enumerate(prompts):
        seqs[i, : len(p)] = p
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t).logits_BTV))
    rows = np.arange(len(prompts))
    tokens, logprobs = [], []
    for step in range(n_new):
        last = np.array(lengths) + step - 1
        logp_BV = np.asarray(forward(params, seqs))[rows, last]
        tok = logp_BV.argmax(-1)
        seqs[rows, last + 1] = tok
        tokens.append(tok)
        logprobs.append(logp_BV[rows, tok])
    return np.stack(tokens, 1), np.stack(logprobs, 1)


@pytest.mark.parametrize("name", ["llama-tiny", "llama3-tiny", "qwen2-tiny", "swa-tiny"])
def test_greedy_matches_teacher_forced(tiny, name):
    model, params = tiny(name)
    g = generate(model, params, PROMPTS, max_new_tokens=NEW)
    want_tokens, want_logprobs = teacher_forced_greedy(model, params, PROMPTS, NEW)
    assert g.tokens_BRT.shape == (3, 1, NEW) and g.tokens_BRT.dtype == jnp.int32
    np.testing.assert_array_equal(g.tokens_BRT[:, 0], want_tokens)
    np.testing.assert_allclose(g.logprobs_BRT[:, 0], want_logprobs, atol=1e-4)
    assert (g.lengths_BR == NEW).all() and not g.finished_BR.any()
    s = g.stats
    assert (int(s["decode_steps"]), int(s["model_calls"])) == (NEW - 1, NEW)
    assert int(s["tokens_generated"]) == 3 * NEW and int(s["prompt_tokens"]) == 15


def test_array_prompts_equal_list_prompts_without_recompiling(tiny):
    model, params = tiny("llama-tiny")
    a = generate(model, params, PROMPTS, max_new_tokens=NEW)
    count = trace_count()
    tokens_BT = np.full((3, 12), 77, np.int32)  # junk padding must be ignored
    for i, p in enumerate(PROMPTS):
        tokens_BT[i, : len(p)] = p
    b = generate(model, params, (jnp.asarray(tokens_BT), np.array([3, 11, 1])), max_new_tokens=NEW)
    c = generate(model, params, [[7, 7], [1] * PROMPT_BUCKET, [3, 2, 1]], max_new_tokens=NEW)  # same bucket
    assert trace_count() == count
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not (c.tokens_BRT == a.tokens_BRT).all()


def test_greedy_stop_tokens_and_samples(tiny):
    model, params = tiny("llama-tiny")
    free = np.asarray(generate(model, params, PROMPTS, max_new_tokens=NEW).tokens_BRT[:, 0])
    # Every row meets a stop token by position 1 (its own second token), so the loop must exit early.
    stops = {int(t) for t in free[:, 1]}
    g = generate(model, params, PROMPTS, max_new_tokens=NEW, stop_tokens=stops, num_samples=2, pad_id=3)
    want_len = [1 + next(i for i, t in enumerate(row) if t in stops) for row in free]
    assert (g.tokens_BRT[:, 0] == g.tokens_BRT[:, 1]).all()  # greedy: every sample is the same
    assert g.lengths_BR.tolist() == [[n, n] for n in want_len]
    assert g.finished_BR.all()
    for b, n in enumerate(want_len):
        np.testing.assert_array_equal(g.tokens_BRT[b, :, :n], np.broadcast_to(free[b, :n], (2, n)))
        assert (g.tokens_BRT[b, :, n:] == 3).all() and (g.logprobs_BRT[b, :, n:] == 0).all()
        assert (g.logprobs_BRT[b, :, :n] < 0).all()
    s = g.stats
    assert int(s["decode_steps"]) == max(want_len) - 1 < NEW
    assert int(s["model_calls"]) == 1 + int(s["decode_steps"])  # one prefill, shared by both samples
    assert int(s["tokens_generated"]) == 2 * sum(want_len)


SAMPLER = Sampler(temperature=1.0, top_k=64)
STOPS = range(0, 128, 4)  # about a quarter of the vocabulary


def sampled(tiny, rng, stop_when=AllFinished(), **kw):  # noqa: B008
    model, params = tiny("llama-tiny")
    kw = dict(max_new_tokens=24, sampler=SAMPLER, stop_tokens=STOPS, rng=rng, num_samples=4) | kw
    return generate(model, params, PROMPTS, stop_when=stop_when, **kw)


def test_sampled_generation_is_reproducible_and_varied(tiny):
    a = sampled(tiny, jax.random.key(0))
    count = trace_count()
    b, c = sampled(tiny, jax.random.key(0)), sampled(tiny, jax.random.key(1))
    assert trace_count() == count
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not (a.tokens_BRT == c.tokens_BRT).all()
    for prompt_RT in np.asarray(a.tokens_BRT):
        assert len({tuple(row) for row in prompt_RT}) > 1  # the R samples of one prompt differ
    assert int(a.stats["model_calls"]) == 1 + int(a.stats["decode_steps"])
    n = np.asarray(a.lengths_BR)
    assert int(a.stats["decode_steps"]) == n.max() - 1
    stopped = np.isin(np.asarray(a.tokens_BRT), STOPS)
    for (b, r), length in np.ndenumerate(n):  # finished rows end at their first stop token, then pad
        first_stop = np.argmax(stopped[b, r]) + 1 if stopped[b, r].any() else None
        assert bool(a.finished_BR[b, r]) == (first_stop is not None)
        assert length == (first_stop or 24)
        assert (a.tokens_BRT[b, r, length:] == 0).all()


def test_m_of_r_stops_at_first_finish(tiny):
    full = sampled(tiny, jax.random.key(0))
    first = sampled(tiny, jax.random.key(0), stop_when=MOfRFinished(1))
    lengths, finished = np.asarray(full.lengths_BR), np.asarray(full.finished_BR)
    assert finished.any(-1).all()  # precondition: every prompt has a sample that finishes
    # The step at which each prompt first has a finished sample: its other samples stop there, and the loop
    # when every prompt has one.
    n_B1 = np.array([lengths[b][finished[b]].min() for b in range(len(PROMPTS))])[:, None]
    assert int(first.stats["decode_steps"]) == n_B1.max() - 1 < int(full.stats["decode_steps"])
    # Same per-step keys: each prompt's early-stopped samples are the prefixes of the full run's.
    np.testing.assert_array_equal(first.lengths_BR, np.minimum(lengths, n_B1))
    np.testing.assert_array_equal(first.finished_BR, finished & (lengths <= n_B1))
    T = np.arange(full.tokens_BRT.shape[-1])
    np.testing.assert_array_equal(np.where(T < n_B1[..., None], full.tokens_BRT, 0), first.tokens_BRT)
    assert int(first.stats["tokens_generated"]) == np.minimum(lengths, n_B1).sum()
    assert (np.asarray(first.finished_BR).sum(-1) >= 1).all()


@pytest.mark.parametrize("prompts, kw, match", [
    (PROMPTS, dict(max_len=12), r"prompt 1 has 11 tokens.*needs 19.*max_len=12"),
    (PROMPTS, dict(max_len=5000), r"max_len=5000 exceeds the model's max_seq_len=2048"),
    ([[1, 2], [3, 200, -1]], {}, r"prompt 1 tokens contain ids \[-1, 200\] outside the vocabulary"),
    ([[1, 2], []], {}, r"prompt 1 must be a non-empty"),
    ((np.zeros((2, 4), np.int32), np.array([2, 0])), {}, r"prompt 1 has length 0"),
    ([], {}, r"prompts must be a non-empty"),
    (PROMPTS, dict(max_new_tokens=0), r"max_new_tokens=0 must be an int >= 1"),
    (PROMPTS, dict(num_samples=0), r"num_samples=0 must be an int >= 1"),
    (PROMPTS, dict(sampler=Sampler()), r"rng is required for Sampler\(temperature=1.0"),
    (PROMPTS, dict(stop_tokens=[5, 128]), r"stop_tokens contain ids \[128\]"),
    (PROMPTS, dict(num_samples=2, stop_when=MOfRFinished(3)), r"MOfRFinished\(m=3\).*num_samples=2"),
])
def test_bad_input_fails_early_naming_the_value(tiny, prompts, kw, match):
    model, params = tiny("llama-tiny")
    kw = dict(max_new_tokens=NEW) | kw
    with pytest.raises(ValueError, match=match):
        generate(model, params, prompts, **kw)


def test_sampled_steps_draw_with_fresh_keys(tiny):
    """With flat logits (final norm scale 0: every logit is 0) each draw is uniform over the 128 tokens: 24 fresh
    draws give ~22 distinct tokens per row (12 or fewer has probability < 1e-9), and rows differ. A key reused
    across steps repeats the same token per row."""
    model, params = tiny("llama-tiny")
    flat = {**params, "final_norm": jax.tree.map(jnp.zeros_like, params["final_norm"])}
    g = generate(model, flat, PROMPTS, max_new_tokens=24, sampler=Sampler(), rng=jax.random.key(3), num_samples=4)
    rows = np.asarray(g.tokens_BRT).reshape(-1, 24)
    assert all(len(set(row.tolist())) > 12 for row in rows)  # per row: steps draw afresh
    assert len({tuple(row) for row in rows}) == len(rows)  # rows differ
    np.testing.assert_allclose(g.logprobs_BRT, -np.log(model.cfg.vocab_size), rtol=1e-5)


def test_sampled_logprobs_are_of_the_tempered_untruncated_distribution(tiny):
    """logprobs_BRT[b, r, t] = log softmax(logits / τ)[token] of the model's logits at that position, recomputed
    by a teacher-forced forward over prompt + sample (what RL's importance ratios rely on)."""
    model, params = tiny("llama-tiny")
    temperature = 0.7
    g = generate(model, params, PROMPTS, max_new_tokens=6, sampler=Sampler(temperature, top_k=5),
                 rng=jax.random.key(4), num_samples=2)
    forward = jax.jit(lambda t: model.apply({"params": params}, t).logits_BTV)
    for b, prompt in enumerate(PROMPTS):
        for r in range(2):
            n = int(g.lengths_BR[b, r])
            sample_T = np.asarray(g.tokens_BRT[b, r, :n])
            seq = np.concatenate([prompt, sample_T])[None].astype(np.int32)
            logits_TV = np.asarray(forward(seq))[0, len(prompt) - 1: len(prompt) - 1 + n]
            want = np.asarray(jax.nn.log_softmax(logits_TV / temperature))[np.arange(n), sample_T]
            np.testing.assert_allclose(g.logprobs_BRT[b, r, :n], want, atol=1e-4)
            assert not np.allclose(want, np.asarray(jax.nn.log_softmax(logits_TV))[np.arange(n), sample_T],
                                   atol=1e-3)  # τ matters on these tokens: untempered log-probs would fail
