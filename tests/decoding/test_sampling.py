import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmx.decoding import Greedy, Sampler, process_logits, sample, token_logprobs

B, V = 4, 12
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
# Logits on a 1/64 grid: dividing by a temperature can flush subnormals like 1e-38 to 0 on CPU, turning
# distinct logits into ties; that is float arithmetic, not sampler logic, so the strategy avoids it.
logits_st = hnp.arrays(np.float32, (B, V), elements=st.integers(-512, 512).map(lambda i: i / 64))


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def draws(sampler, logits_BV, seed=0, n=64):
    """n samples per row, drawn in one call on the tiled rows: [n, B]."""
    tiled = jnp.tile(jnp.asarray(logits_BV), (n, 1))
    return np.asarray(sample(sampler, tiled, jax.random.key(seed))).reshape(n, -1)


@SETTINGS
@given(logits_st, st.integers(1, V - 1), st.floats(0.3, 2.0))
def test_top_k_support(logits, k, temperature):
    tokens = draws(Sampler(temperature=temperature, top_k=k), logits)
    kth = np.sort(logits, -1)[:, -k]
    assert (np.take_along_axis(logits, tokens.T, -1) >= kth[:, None]).all()


@SETTINGS
@given(logits_st, st.floats(0.01, 1.0, exclude_min=True))
def test_top_p_keeps_minimal_top_set(logits, p):
    kept = np.isfinite(np.asarray(process_logits(Sampler(top_p=p), logits)))
    probs = softmax64(logits)
    for kept_V, p_V in zip(kept, probs, strict=True):
        assert kept_V.any()
        mass = p_V[kept_V].sum()
        assert mass >= p - 1e-5  # reaches p
        assert mass - p_V[kept_V].min() < p + 1e-5  # minimal: without the least likely kept token, short of p
        if (~kept_V).any():  # a top set: nothing dropped is more likely than anything kept
            assert p_V[~kept_V].max() <= p_V[kept_V].min() + 1e-7


@SETTINGS
@given(logits_st, st.floats(0.01, 0.95))
def test_min_p(logits, min_p):
    kept = np.isfinite(np.asarray(process_logits(Sampler(min_p=min_p), logits)))
    probs = softmax64(logits)
    bar = min_p * probs.max(-1, keepdims=True)
    assert kept[probs > bar * (1 + 1e-4)].all()
    assert not kept[probs < bar * (1 - 1e-4)].any()
    assert kept[np.arange(B), probs.argmax(-1)].all()


@SETTINGS
@given(logits_st, st.lists(st.integers(0, V - 1), min_size=B, max_size=B))
def test_zero_and_tiny_temperature_are_greedy(logits, winners):
    argmax = logits.argmax(-1)
    assert (np.asarray(sample(Greedy(), logits)) == argmax).all()
    assert (draws(Sampler(temperature=0.0), logits, n=1)[0] == argmax).all()
    # Give each row a clear winner, so that temperature 1e-4 is cold enough to always pick it.
    logits = logits.copy()
    logits[np.arange(B), winners] = logits.max(-1) + 0.1
    assert (draws(Sampler(temperature=1e-4), logits, n=8) == np.array(winners)).all()


def test_rng_determinism_and_variety():
    logits = jnp.zeros((8, 64))
    s = Sampler()
    a, b = sample(s, logits, jax.random.key(0)), sample(s, logits, jax.random.key(0))
    c = sample(s, logits, jax.random.key(1))
    assert (a == b).all()
    assert not (a == c).all()  # equal by chance with probability 64**-8


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """Independent float64 implementation of temperature -> top-k -> top-p -> min-p."""
    p = softmax64(np.asarray(logits) / temperature)
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[:top_k]] = True
    p = np.where(keep, p, 0) / p[keep].sum()
    cum_before = np.cumsum(p[order]) - p[order]
    keep_p = np.zeros_like(keep)
    keep_p[order[cum_before < top_p]] = True
    p = np.where(keep_p, p, 0) / p[keep_p].sum()
    p = np.where(p >= min_p * p.max(), p, 0)
    return p / p.sum()


def test_sample_frequencies_match_processed_softmax():
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -3.0], np.float32)
    s = Sampler(temperature=0.8, top_k=6, top_p=0.95, min_p=0.1)
    expected = reference_probs(logits, 0.8, 6, 0.95, 0.1)
    assert ((expected > 0).sum(), (expected == 0).sum()) == (5, 3)  # every filter matters here
    n = 20_000
    # One jitted program (eager dispatch would compile every op for this new shape).
    draw = jax.jit(lambda key: sample(s, jnp.tile(logits[None], (n, 1)), key))
    counts = np.bincount(np.asarray(draw(jax.random.key(7))), minlength=len(logits))
    assert (counts[expected == 0] == 0).all()
    e, c = expected[expected > 0] * n, counts[expected > 0]
    chi2, df = ((c - e) ** 2 / e).sum(), len(e) - 1
    z = 3.72  # Wilson-Hilferty approximation of the chi-square 1 - 1e-4 quantile
    assert chi2 < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    processed = np.asarray(jax.jit(process_logits, static_argnums=0)(s, logits[None]))[0]
    np.testing.assert_allclose(softmax64(processed), expected, atol=1e-6)


def test_token_logprobs_use_temperature_without_truncation():
    logits = jax.random.normal(jax.random.key(0), (3, V))
    tokens = jnp.array([0, 5, 11])
    for s, t in [(Greedy(), 1.0), (Sampler(temperature=0), 1.0), (Sampler(0.7, top_k=2, top_p=0.5), 0.7)]:
        want = np.log(softmax64(np.asarray(logits) / t))[np.arange(3), tokens]
        np.testing.assert_allclose(token_logprobs(s, logits, tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=1.0), "min_p"), (dict(min_p=-0.1), "min_p"),
])
def test_sampler_validation(kw, field):
    with pytest.raises(ValueError, match=f"Sampler.{field}="):
        Sampler(**kw)


def test_samplers_are_hashable_static_args():
    assert hash(Sampler(1, 5)) == hash(Sampler(1.0, 5)) and Sampler(1, 5) == Sampler(1.0, 5)
    assert Greedy() == Greedy() and len({Greedy(), Greedy(), Sampler(), Sampler()}) == 2
