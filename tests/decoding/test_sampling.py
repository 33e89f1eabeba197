import functools
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
    s = Sampler(temperature=temperature, top_k=k)
    kth = np.sort(logits, -1)[:, -k]
    # Exactly the tokens at or above the k-th largest logit (ties with it kept, as in Hugging Face).
    np.testing.assert_array_equal(np.isfinite(np.asarray(process_logits(s, logits))), logits >= kth[:, None])
    tokens = draws(s, logits)
    assert (np.take_along_axis(logits, tokens.T, -1) >= kth[:, None]).all()


@SETTINGS
@given(logits_st, st.floats(0.01, 1.0, exclude_min=True), st.sampled_from([1.0, 0.5, 2.0]))
def test_top_p_keeps_minimal_top_set(logits, p, temperature):
    kept = np.isfinite(np.asarray(process_logits(Sampler(temperature=temperature, top_p=p), logits)))
    probs = softmax64(logits / temperature)  # top-p acts on the tempered distribution
    for kept_V, p_V in zip(kept, probs, strict=True):
        assert kept_V.any()
        mass = p_V[kept_V].sum()
        assert mass >= p - 1e-5  # reaches p
        assert mass - p_V[kept_V].min() < p + 1e-5  # minimal: without the least likely kept token, short of p
        if (~kept_V).any():  # a top set: nothing dropped is more likely than anything kept
            assert p_V[~kept_V].max() <= p_V[kept_V].min() + 1e-7


@SETTINGS
@given(logits_st, st.floats(0.01, 0.95), st.sampled_from([1.0, 0.5, 2.0]))
def test_min_p(logits, min_p, temperature):
    kept = np.isfinite(np.asarray(process_logits(Sampler(temperature=temperature, min_p=min_p), logits)))
    probs = softmax64(logits / temperature)  # min-p acts on the tempered distribution
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


# ------------------------------------------------------------------------------------------------------------
# process_logits against an independent float64 reference of the sequential convention, over every combination
# of filters. Each case is chosen (by a seeded search) so that every filter it enables changes the result, and so
# that the reference's mis-ordered variants differ from it: the comparison would catch each of those bugs.

FILTERS = ("temperature", "top_k", "top_p", "min_p")
V_REF, ROWS, MARGIN = 10, 12, 1e-3


def reference_probs(logits_V, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, *, variant=None):
    """Temperature, then top-k, top-p and min-p, each on the renormalised distribution the previous step left.

    variant (deliberately wrong orders, for the negative controls): "top_p_before_top_k_renorm" takes the top-p
    mass from the tempered distribution before top-k renormalised it; "top_p_untempered" / "min_p_untempered"
    apply that filter to the untempered distribution."""
    logits_V = np.asarray(logits_V, np.float64)
    p = softmax64(logits_V / temperature)
    untempered = softmax64(logits_V)
    if top_k:
        p = np.where(logits_V >= np.sort(logits_V)[-top_k], p, 0.0)
    before_k = softmax64(logits_V / temperature)
    p = p / p.sum()
    if top_p < 1:
        untempered_kept = untempered * (p > 0) / (untempered * (p > 0)).sum()
        basis = {"top_p_before_top_k_renorm": before_k * (p > 0), "top_p_untempered": untempered_kept}.get(variant, p)
        order = np.argsort(-basis, kind="stable")
        mass_before = np.cumsum(basis[order]) - basis[order]
        keep = np.zeros(p.shape, bool)
        keep[order[(mass_before < top_p) & (basis[order] > 0)]] = True
        keep[order[0]] = True
        p = np.where(keep, p, 0.0)
        p = p / p.sum()
    if min_p > 0:
        basis = untempered * (p > 0) if variant == "min_p_untempered" else p
        p = np.where(basis >= min_p * basis.max(), p, 0.0)
        p = p / p.sum()
    return p


def _robust(logits_V, kw) -> bool:
    """No threshold within MARGIN (relative) of a decision, so float32 and float64 keep the same tokens."""
    support = reference_probs(logits_V, **kw) > 0
    for name in ("top_p", "min_p"):
        if kw[name] not in (0.0, 1.0):
            for s in (1 - MARGIN, 1 + MARGIN):
                if not np.array_equal(reference_probs(logits_V, **{**kw, name: kw[name] * s}) > 0, support):
                    return False
    return True


def _controls(on, kw):
    """The wrong references the chosen rows must tell apart from the right one: each enabled filter removed, and
    each mis-ordering that the enabled filters make possible."""
    off = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    out = {f"no {f}": ({**kw, f: off[f]}, None) for f in FILTERS if on[f]}
    if on["top_k"] and on["top_p"]:
        out["top-p before top-k renormalisation"] = (kw, "top_p_before_top_k_renorm")
    if on["temperature"] and on["top_p"]:
        out["top-p before temperature"] = (kw, "top_p_untempered")
    if on["temperature"] and on["min_p"]:
        out["min-p before temperature"] = (kw, "min_p_untempered")
    if on["top_k"]:
        out["top-k keeps k - 1"] = ({**kw, "top_k": kw["top_k"] - 1}, None) if kw["top_k"] > 1 else None
    return {k: v for k, v in out.items() if v is not None}


@functools.cache
def filter_case(mask: int):
    """(sampler kwargs, logits [ROWS, V], controls) for the filter combination `mask` (bit i: FILTERS[i] on)."""
    on = {f: bool(mask >> i & 1) for i, f in enumerate(FILTERS)}
    for seed in range(200):
        rng = np.random.default_rng([mask, seed])
        kw = {"temperature": float(rng.choice([0.5, 0.7, 1.6, 2.5])) if on["temperature"] else 1.0,
              "top_k": int(rng.integers(3, V_REF - 2)) if on["top_k"] else 0,
              "top_p": float(rng.uniform(0.5, 0.9)) if on["top_p"] else 1.0,
              "min_p": float(rng.uniform(0.05, 0.3)) if on["min_p"] else 0.0}
        rows = [r for r in (rng.normal(0, 1.5, V_REF).astype(np.float32) for _ in range(4 * ROWS)) if _robust(r, kw)]
        rows = np.stack(rows[:ROWS]) if len(rows) >= ROWS else None
        controls = _controls(on, kw)
        if rows is not None and all(
                any(not np.allclose(reference_probs(r, **ckw, variant=v), reference_probs(r, **kw), atol=1e-3)
                    for r in rows) for ckw, v in controls.values()):
            return kw, rows, controls
    raise AssertionError(f"no seed gives a discriminating case for filters {on}")


@pytest.mark.parametrize("mask", range(16), ids=lambda m: "+".join(f for i, f in enumerate(FILTERS) if m >> i & 1)
                         or "plain")
def test_processed_softmax_matches_sequential_reference(mask):
    kw, rows, controls = filter_case(mask)
    # Negative controls: every wrong reference differs from the right one on these rows (by more than the
    # tolerance below), so a sampler that implemented any of them would fail the comparison.
    want = np.stack([reference_probs(r, **kw) for r in rows])
    for name, (ckw, variant) in controls.items():
        wrong = np.stack([reference_probs(r, **ckw, variant=variant) for r in rows])
        assert np.abs(wrong - want).max() > 1e-3, name
    got = np.asarray(jax.jit(process_logits, static_argnums=0)(Sampler(**kw), rows))
    np.testing.assert_array_equal(np.isfinite(got), want > 0)  # the exact kept set
    np.testing.assert_allclose(softmax64(got), want, atol=1e-6)


def test_sample_frequencies_match_processed_softmax():
    """The draw itself: frequencies of `sample` match softmax(process_logits) (chi-square, fixed seed), and the
    same test rejects draws from a distribution that differs by one filter (a negative control)."""
    kw, rows, _ = filter_case(0b1111)
    logits, s = rows[0], Sampler(**kw)
    expected = softmax64(np.asarray(jax.jit(process_logits, static_argnums=0)(s, logits[None]))[0])
    n = 20_000
    draw = jax.jit(lambda key: sample(s, jnp.tile(logits[None], (n, 1)), key))  # one program, not op by op
    counts = np.bincount(np.asarray(draw(jax.random.key(7))), minlength=len(logits))

    def accepted(counts, probs):
        if (counts[probs == 0] > 0).any():
            return False
        e, c = probs[probs > 0] * n, counts[probs > 0]
        chi2, df = ((c - e) ** 2 / e).sum(), len(e) - 1
        z = 3.72  # Wilson-Hilferty approximation of the chi-square 1 - 1e-4 quantile
        return chi2 < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3 if df else True

    assert accepted(counts, expected)
    wrong = reference_probs(logits, **{**kw, "temperature": 1.0})
    wrong_counts = np.bincount(np.random.default_rng(0).choice(len(logits), n, p=wrong), minlength=len(logits))
    assert not accepted(wrong_counts, expected)


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
