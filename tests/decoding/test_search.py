"""Beam search and particle filtering: beam 1 is greedy generate (tokens and stats), a wider beam finds likelier
sequences and a beam as wide as the vocabulary is exhaustive search; particles sample what generate samples until
their first delimiter, keep their decode-state rows through waiting and resampling (log-probs = a teacher-forced
forward, attention and Mamba-2) with stats counted by hand, a constant scorer leaves independent sampling's
distribution (with a negative control); A* search finds the paths a scorer wants with fewer tokens than
sampling, backtracks, keeps consistent rows and stops at its token budget; bad input fails naming the value.
(Particle filtering and A* with the exact process verifier against best-of-N: tests/data/test_process.py.)"""

import math

import jax
import numpy as np
import pytest

from lmx.decoding import Sampler, astar_search, beam_search, cost, generate, particle_filter

PROMPTS = [[5, 9, 17], [42], [3, 1, 4, 1, 5], [7, 7], [100, 2, 64], [11]]


def _forward_logp(model, params, seqs_XS):
    return np.asarray(jax.nn.log_softmax(jax.jit(lambda t: model.apply({"params": params}, t).logits_BTV)(seqs_XS)))


def _teacher_forced(model, params, prompts, tokens_BRT, lengths_BR, temperature=1.0):
    """log softmax(logits / τ)[token] of every generated token by one forward over prompt + tokens (no cache)."""
    B, R, T = tokens_BRT.shape
    seqs = np.zeros((B, R, max(map(len, prompts)) + T), np.int32)
    for b, p in enumerate(prompts):
        seqs[b, :, : len(p)], seqs[b, :, len(p): len(p) + T] = p, tokens_BRT[b]
    logits = jax.jit(lambda t: model.apply({"params": params}, t).logits_BTV)(seqs.reshape(B * R, -1))
    logp = np.asarray(jax.nn.log_softmax(logits / temperature)).reshape(B, R, seqs.shape[-1], -1)
    want = np.stack([np.take_along_axis(logp[b][:, len(p) - 1 + np.arange(T)], tokens_BRT[b][..., None], -1)[..., 0]
                     for b, p in enumerate(prompts)])
    return np.where(np.arange(T) < lengths_BR[..., None], want, 0.0)


# ------------------------------------------------------------------------------------------------ beam search
@pytest.fixture(scope="module")
def llama(tiny):
    return tiny("llama-tiny", num_layers=1)


STOPS = range(0, 128, 9)  # some rows stop early


@pytest.fixture(scope="module")
def beams(llama):
    model, params = llama
    run = lambda fn, **kw: jax.device_get(fn(model, params, PROMPTS, max_new_tokens=8, stop_tokens=STOPS, **kw))
    return run(generate), run(beam_search, beam=1), run(beam_search, beam=4)


def test_beam_1_is_greedy_generate(beams):
    g, b, _ = beams
    assert g.finished_BR.any() and not g.finished_BR.all()
    for field in ("tokens_BRT", "lengths_BR", "finished_BR"):
        np.testing.assert_array_equal(getattr(b, field), getattr(g, field))
    np.testing.assert_allclose(b.logprobs_BRT, g.logprobs_BRT, atol=1e-6)
    np.testing.assert_allclose(b.scores_BR, g.logprobs_BRT.sum(-1) / g.lengths_BR, rtol=1e-6)
    for key in g.stats:  # the same stats, counted the same way
        np.testing.assert_allclose(b.stats[key], g.stats[key], rtol=1e-6, err_msg=key)
    assert int(b.stats["kept_tokens"]) == int(b.stats["tokens_generated"])


def test_wider_beams_find_better_hypotheses_from_consistent_rows(llama, beams):
    model, params = llama
    _, greedy, b = beams
    K = b.lengths_BR.shape[1]
    best, base = b.scores_BR[:, 0], greedy.scores_BR[:, 0]  # Σ logp / len: the objective
    assert (best >= base - 1e-6).all() and (best > base + 1e-3).sum() >= 2
    assert (np.diff(b.scores_BR, axis=1) <= 0).all()  # ranked, best first
    np.testing.assert_allclose(b.scores_BR, b.logprobs_BRT.sum(-1) / b.lengths_BR, rtol=1e-5)
    assert all(len({tuple(r) for r in b.tokens_BRT[i]}) == K for i in range(len(PROMPTS)))  # distinct hypotheses
    assert b.finished_BR.any() and not b.finished_BR.all()
    # Each beam's log-probs are those of its own prefix: state rows followed their hypotheses through `select`.
    np.testing.assert_allclose(b.logprobs_BRT, _teacher_forced(model, params, PROMPTS, b.tokens_BRT, b.lengths_BR),
                               atol=1e-5)
    s = b.stats
    # Sampled tokens, each once (a prefix kept by two beams was sampled once; pruned expansions were sampled too).
    assert len(PROMPTS) * K <= int(s["tokens_generated"]) <= len(PROMPTS) * K * 8
    assert int(s["kept_tokens"]) == b.lengths_BR.sum()
    assert int(s["model_calls"]) == 1 + int(s["decode_steps"]) <= 8
    assert float(s["flops"]) > 2 * float(greedy.stats["flops"]) and int(s["overflow"]) == 0


def test_a_beam_as_wide_as_the_vocabulary_is_exhaustive_search(llama):
    """Two tokens, stop tokens ending some hypotheses after one: the V best of all V + V·(V − |stops|) candidate
    sequences under Σ logp / len^α, found by enumerating them with a teacher-forced forward."""
    model, params = llama
    V, stops, alpha = model.cfg.vocab_size, set(range(0, 128, 5)), 1.0
    prompts = PROMPTS[:1]
    b = jax.device_get(beam_search(model, params, prompts, beam=V, max_new_tokens=2, stop_tokens=stops,
                                   length_penalty=alpha))
    for i, p in enumerate(prompts):
        seqs = np.array([[*p, t] for t in range(V)], np.int32)
        logp = _forward_logp(model, params, seqs)  # [V, len + 1, V]
        first, second = logp[0, len(p) - 1], logp[:, len(p)]
        cands = [((t,), first[t]) for t in stops] + [
            ((t, u), (first[t] + second[t, u]) / 2**alpha) for t in range(V) if t not in stops for u in range(V)]
        cands.sort(key=lambda c: -c[1])
        got = [tuple(row[:n]) for row, n in zip(b.tokens_BRT[i].tolist(), b.lengths_BR[i], strict=True)]
        assert got == [c[0] for c in cands[:V]]
        np.testing.assert_allclose(b.scores_BR[i], [c[1] for c in cands[:V]], rtol=1e-5)
    assert b.finished_BR.any()  # finished hypotheses compete with the longer ones


# ------------------------------------------------------------------------------------------- particle filtering
V_SMALL, DELIMS, TAU = 8, (0, 1, 2), 0.8  # 3 of 8 tokens end a step: steps of ~2 tokens, several resamplings


def chi2_accepts(counts, probs) -> bool:
    """Chi-square goodness of fit at level 1e-4 (Wilson-Hilferty quantile); cells expected < 5 are pooled."""
    e = probs * counts.sum()
    small = e < 5
    c, e = np.append(counts[~small], counts[small].sum()), np.append(e[~small], e[small].sum())
    c, e = c[e > 0], e[e > 0]
    chi2, df = ((c - e) ** 2 / e).sum(), len(e) - 1
    return chi2 < df * (1 - 2 / (9 * df) + 3.72 * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def small(tiny):
    """One prompt copied into 400 independent filters of 4 particles, with a constant scorer that records what it
    is shown."""
    model, params = tiny("llama-tiny", num_layers=1, vocab_size=V_SMALL)
    prompts, seen = [[5, 3, 1]] * 400, []

    def constant(tokens_BNT, lengths_BN):
        seen.append((tokens_BNT.copy(), lengths_BN.copy()))
        return np.full(lengths_BN.shape, 0.5)

    pf = jax.device_get(particle_filter(model, params, prompts, num_particles=4, step_token=DELIMS, scorer=constant,
                                        max_new_tokens=5, sampler=Sampler(TAU), rng=jax.random.key(0)))
    return model, params, prompts, pf, seen


def test_particles_sample_what_generate_samples_until_their_first_delimiter(small):
    model, params, prompts, pf, seen = small
    g = jax.device_get(generate(model, params, prompts, max_new_tokens=5, sampler=Sampler(TAU), num_samples=4,
                                rng=jax.random.key(0)))
    tokens, lengths = seen[0]  # the pool the scorer saw before the first resampling
    first = np.where(np.isin(g.tokens_BRT, DELIMS), np.arange(5), 5).min(-1) + 1  # up to the delimiter, inclusive
    np.testing.assert_array_equal(lengths, np.minimum(first, 5))
    mask = np.arange(5) < lengths[..., None]
    np.testing.assert_array_equal(np.where(mask, tokens, 0), np.where(mask, g.tokens_BRT, 0))
    assert len(seen) == int(pf.stats["pf_steps"]) >= 3 and int(pf.stats["resamples"]) == len(seen) - 1


def test_particles_keep_their_rows_through_waiting_and_resampling(small):
    model, params, prompts, pf, _ = small
    np.testing.assert_allclose(pf.logprobs_BRT, _teacher_forced(model, params, prompts, pf.tokens_BRT, pf.lengths_BR,
                                                                TAU), atol=1e-5)
    dup = [len({tuple(r) for r in pf.tokens_BRT[b]}) < 4 for b in range(len(prompts))]
    assert np.mean(dup) > 0.5  # resampling copied rows
    s = pf.stats
    assert int(s["tokens_generated"]) > int(s["kept_tokens"]) == pf.lengths_BR.sum()  # dropped particles' tokens
    assert int(s["model_calls"]) == 1 + int(s["decode_steps"]) and int(s["overflow"]) == 0
    np.testing.assert_allclose(pf.rewards_BR, 0.5)


def test_a_constant_scorer_leaves_independent_sampling(small):
    """Resampling by equal weights keeps each final particle distributed as one independent sample: its first
    token follows the model's (what generate draws from). Negative control: a scorer that prefers particles
    starting with token 3 must fail the same test."""
    model, params, prompts, pf, _ = small
    probs = np.asarray(jax.nn.softmax(_forward_logp(model, params, np.array([prompts[0]]))[0, -1] / TAU))
    counts = np.bincount(pf.tokens_BRT[:, 0, 0], minlength=V_SMALL)  # one particle per independent filter
    assert chi2_accepts(counts, probs)

    def prefers_3(tokens_BNT, lengths_BN):
        return np.where(tokens_BNT[..., 0] == 3, 0.8, 0.2)

    biased = particle_filter(model, params, prompts, num_particles=4, step_token=DELIMS, scorer=prefers_3,
                             max_new_tokens=5, sampler=Sampler(TAU), rng=jax.random.key(0))
    assert not chi2_accepts(np.bincount(np.asarray(biased.tokens_BRT[:, 0, 0]), minlength=V_SMALL), probs)


def test_mamba2_waiting_rows_keep_their_state_and_stats_count_each_position(tiny):
    """Mamba-2 rings: a row that waits for the others is fed and rolled back one position; a wrong rollback would
    give log-probs that a teacher-forced forward does not reproduce. One particle per prompt resamples to itself,
    so the stats can be counted by hand: each row's positions once, its last token unfed."""
    model, params = tiny("mamba2-tiny", num_layers=1, vocab_size=V_SMALL)
    prompts = [[5, 3, 1], [4], [6, 7, 3, 4, 5]]
    pf = jax.device_get(particle_filter(model, params, prompts, num_particles=1, step_token=DELIMS,
                                        scorer=lambda t, n: np.full(n.shape, 0.5), max_new_tokens=8,
                                        sampler=Sampler(TAU), rng=jax.random.key(3)))
    assert int(pf.stats["pf_steps"]) >= 3 and (pf.lengths_BR == 8).all()
    np.testing.assert_allclose(pf.logprobs_BRT, _teacher_forced(model, params, prompts, pf.tokens_BRT, pf.lengths_BR,
                                                                TAU), atol=1e-4)
    s, P, L = pf.stats, np.array([len(p) for p in prompts]), pf.lengths_BR[:, 0]
    assert int(s["tokens_generated"]) == int(s["kept_tokens"]) == L.sum()
    for key, fn in (("flops", cost.forward_flops), ("state_bytes_read", cost.state_bytes_read)):
        args = () if key == "flops" else (1,)  # the rings keep one rollback slot
        want = fn(model.cfg, 0, P, *args).sum() + fn(model.cfg, P, P + L - 1, *args).sum()
        np.testing.assert_allclose(s[key], want, rtol=1e-5, err_msg=key)
    # Rows wait for each other at every step, so the decode calls exceed the longest row's positions.
    assert int(s["model_calls"]) == 1 + int(s["decode_steps"]) > L.max()
    assert float(s["ssm_state_bytes"]) == 3 * cost.ssm_state_bytes_per_row(model.cfg, rollback_window=1)


# ------------------------------------------------------------------------------------------------ A* search
GOOD = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)  # a step holding token 3 or 5 is a wrong step
A_PROMPTS = [[5, 3, 1], [4], [6, 7, 3, 4, 5]] * 4


def _good_paths(tokens_BKT, lengths_BK):
    ok = np.where(np.arange(tokens_BKT.shape[-1]) < lengths_BK[..., None], GOOD[tokens_BKT], True).all(-1)
    return np.where(ok, 0.99, 0.01)


@pytest.fixture(scope="module")
def astar(tiny):
    model, params = tiny("llama-tiny", num_layers=1, vocab_size=V_SMALL)
    kw = dict(max_new_tokens=8, sampler=Sampler(TAU), stop_tokens=(7,), rng=jax.random.key(0))
    a = jax.device_get(astar_search(model, params, A_PROMPTS, expand=3, frontier=6, step_token=DELIMS,
                                    scorer=_good_paths, token_budget=60, **kw))
    g = jax.device_get(generate(model, params, A_PROMPTS, num_samples=8, **kw))
    return model, params, kw, a, g


def test_astar_finds_what_the_scorer_wants_with_fewer_tokens_than_sampling(astar):
    model, params, _, a, g = astar
    assert (_good_paths(g.tokens_BRT, g.lengths_BR) > 0.5).mean() < 0.3  # most samples take a wrong step
    assert a.reached_goal_B.all() and (a.finished_BR | (a.lengths_BR == 8)).all()
    np.testing.assert_allclose(_good_paths(a.tokens_BRT, a.lengths_BR), 0.99)
    np.testing.assert_allclose(a.rewards_BR, 0.99)
    np.testing.assert_allclose(a.priorities_BR, np.log(0.99), rtol=1e-6)  # goals are never expanded: f = log r
    assert int(a.stats["tokens_generated"]) < int(g.stats["tokens_generated"]) / 2  # best-of-8 spends > twice
    # The answer's log-probs are a teacher-forced forward's: its rows followed it through every pop and insert.
    np.testing.assert_allclose(a.logprobs_BRT, _teacher_forced(model, params, A_PROMPTS, a.tokens_BRT, a.lengths_BR,
                                                               TAU), atol=1e-5)
    s = a.stats
    assert int(s["kept_tokens"]) == a.lengths_BR.sum() and int(s["overflow"]) == 0
    assert int(s["scorer_calls"]) == a.expansions_B.max() and int(s["expansions"]) == a.expansions_B.sum()
    assert int(s["model_calls"]) == 1 + int(s["decode_steps"])


def test_astar_backtracks_to_older_paths(astar):
    """A prompt whose search expanded more paths than its answer has steps went down a branch and came back to
    the frontier (a beam keeps no such paths)."""
    *_, a, _ = astar
    tokens_BT, n_B = a.tokens_BRT[:, 0], a.lengths_BR[:, 0]
    ends_BT = np.isin(tokens_BT, (*DELIMS, 7)) & (np.arange(8) < n_B[:, None])
    steps_B = ends_BT.sum(-1) + ~ends_BT[np.arange(len(n_B)), n_B - 1]  # a last step cut at the budget counts
    assert (a.expansions_B >= steps_B).all() and (a.expansions_B > steps_B).any()


def test_astar_stops_at_its_token_budget(astar):
    """Budget 1: one round, then the best path found is returned, unfinished unless its first step finished."""
    model, params, kw, *_ = astar
    a = jax.device_get(astar_search(model, params, A_PROMPTS, expand=3, frontier=2, step_token=DELIMS,
                                    scorer=_good_paths, token_budget=1, **kw))
    np.testing.assert_array_equal(a.expansions_B, 1)
    goal_B = (a.finished_BR | (a.lengths_BR == 8))[:, 0]  # a finished first step is popped as a goal
    np.testing.assert_array_equal(a.reached_goal_B, goal_B)
    assert not goal_B.all()
    assert int(a.stats["tokens_generated"]) <= 3 * 8 * len(A_PROMPTS)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(num_particles=0), "num_particles=0"),
    (dict(step_token=200), r"step_token=200 contain ids \[200\]"),
    (dict(step_token=[5, -1]), r"ids \[-1\]"),
    (dict(step_token=()), "at least one delimiter"),
    (dict(sampler=Sampler(0.0)), "non-greedy"),
    (dict(scorer=None), "scorer must be callable"),
    (dict(score_temperature=0.0), "score_temperature=0.0"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_particle_filter_bad_input_fails_naming_the_value(llama, kw, match):
    model, params = llama
    args = dict(num_particles=2, step_token=5, scorer=lambda t, n: np.full(n.shape, 0.5), max_new_tokens=4,
                rng=jax.random.key(0)) | kw
    with pytest.raises((ValueError, TypeError), match=match):
        particle_filter(model, params, PROMPTS, **args)


@pytest.mark.parametrize("bad, match", [(lambda t, n: np.full(n.shape, 1.5), r"\[0, 1\]; got \[1.5"),
                                        (lambda t, n: np.full(n.shape, np.nan), r"\[0, 1\]; got \[nan"),
                                        (lambda t, n: np.zeros(3), r"shape \(3,\), expected \(400, 4\)")])
def test_bad_scorer_output_fails_naming_it(small, bad, match):
    model, params, prompts, _, _ = small  # the fixture's call: compiled already
    with pytest.raises(ValueError, match=match):
        particle_filter(model, params, prompts, num_particles=4, step_token=DELIMS, scorer=bad, max_new_tokens=5,
                        sampler=Sampler(TAU), rng=jax.random.key(0))


@pytest.mark.parametrize("kw, match", [(dict(beam=0), "beam=0"), (dict(beam=129), "beam=129 exceeds"),
                                       (dict(beam=True), "beam=True"), (dict(length_penalty=math.inf), "length_pen"),
                                       (dict(max_new_tokens=0), "max_new_tokens=0")])
def test_beam_search_bad_input_fails_naming_the_value(llama, kw, match):
    model, params = llama
    with pytest.raises(ValueError, match=match):
        beam_search(model, params, PROMPTS, **({"beam": 2, "max_new_tokens": 4} | kw))


@pytest.mark.parametrize("kw, match", [(dict(expand=0), "expand=0"), (dict(frontier=0), "frontier=0"),
                                       (dict(token_budget=0), "token_budget=0"),
                                       (dict(retry_discount=1.5), "retry_discount=1.5"),
                                       (dict(sampler=Sampler(0.0)), "non-greedy"), (dict(scorer=3), "scorer must"),
                                       (dict(step_token=()), "at least one delimiter")])
def test_astar_bad_input_fails_naming_the_value(llama, kw, match):
    model, params = llama
    args = dict(expand=2, frontier=2, step_token=5, scorer=lambda t, n: np.full(n.shape, 0.5), token_budget=8,
                max_new_tokens=4, rng=jax.random.key(0)) | kw
    with pytest.raises((ValueError, TypeError), match=match):
        astar_search(model, params, PROMPTS, **args)
