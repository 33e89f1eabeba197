"""Samplers: frozen, hashable dataclasses (static jit arguments) and the pure functions that apply them.

Logit processing follows the Hugging Face order: temperature, then top-k, top-p, min-p, each applied to the
distribution the previous step left. Masked entries become -inf, so `jax.random.categorical` never picks them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class Greedy:
    """Always the argmax (ties: the lowest token id)."""

    @property
    def is_greedy(self) -> bool:
        return True


@dataclass(frozen=True)
class Sampler:
    """Ancestral sampling. temperature=0 means greedy; top_k=0, top_p=1 and min_p=0 switch those filters off.

    top_k: keep the k largest logits (ties with the k-th are kept, as in Hugging Face).
    top_p: keep the smallest set of most likely tokens whose mass reaches p; the top token is always kept.
    min_p: drop tokens whose probability is below min_p times the top token's probability.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        def field(name, cast, ok, rule):
            value = getattr(self, name)
            try:
                cast_value = cast(value)
            except (TypeError, ValueError):
                cast_value = None
            if cast_value is None or isinstance(value, (bool, str)) or not ok(cast_value):
                raise ValueError(f"Sampler.{name}={value!r} must be {rule}")
            object.__setattr__(self, name, cast_value)  # plain Python numbers: hashable, equal across types

        # Comparisons are written so that NaN fails them.
        field("temperature", float, lambda t: 0 <= t < math.inf, "finite and >= 0 (0 means greedy)")
        field("top_k", operator.index, lambda k: k >= 0, "an int >= 0 (0 means off)")
        field("top_p", float, lambda p: 0 < p <= 1, "in (0, 1]")
        field("min_p", float, lambda p: 0 <= p < 1, "in [0, 1)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _argmax_only(logits_BV):
    """The temperature -> 0 limit: every entry but the argmax is masked."""
    idx_B = jnp.argmax(logits_BV, axis=-1)
    keep_BV = jnp.arange(logits_BV.shape[-1]) == idx_B[:, None]
    return jnp.where(keep_BV, logits_BV, NEG_INF)


def _top_k(logits_BV, k: int):
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, NEG_INF)


def _top_p(logits_BV, p: float):
    # Sort descending (stable, so ties keep id order); a token is kept if the mass strictly before it is < p,
    # which is exactly the smallest prefix with mass >= p, and always includes the first token.
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = (mass_before_BV < p).at[:, 0].set(True)
    keep_BV = jax.vmap(lambda keep, order: jnp.zeros_like(keep).at[order].set(keep))(keep_sorted_BV, order_BV)
    return jnp.where(keep_BV, logits_BV, NEG_INF)


def _min_p(logits_BV, min_p: float):
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); done on logits to avoid underflow.
    max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    return jnp.where(logits_BV >= max_B1 + math.log(min_p), logits_BV, NEG_INF)


def process_logits(sampler: Greedy | Sampler, logits_BV):
    """The logits the sampler draws from (float32); filtered-out entries are -inf."""
    logits_BV = jnp.asarray(logits_BV, jnp.float32)
    if sampler.is_greedy:
        return _argmax_only(logits_BV)
    logits_BV = logits_BV / sampler.temperature
    V = logits_BV.shape[-1]
    # Filters switched off (or that cannot remove anything) are skipped statically.
    if 0 < sampler.top_k < V:
        logits_BV = _top_k(logits_BV, sampler.top_k)
    if sampler.top_p < 1:
        logits_BV = _top_p(logits_BV, sampler.top_p)
    if sampler.min_p > 0:
        logits_BV = _min_p(logits_BV, sampler.min_p)
    return logits_BV


def sample(sampler: Greedy | Sampler, logits_BV, rng=None):
    """One token per row, int32 [B]. `rng` is unused (may be None) for greedy samplers."""
    if sampler.is_greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError(f"sample with {sampler} needs an rng")
    return jax.random.categorical(rng, process_logits(sampler, logits_BV), axis=-1).astype(jnp.int32)


def logprob_temperature(sampler: Greedy | Sampler) -> float:
    return 1.0 if sampler.is_greedy else float(sampler.temperature)


def token_logprobs(sampler: Greedy | Sampler, logits_BV, tokens_B):
    """log softmax(logits / τ)[token], float32 [B], with τ the sampler's temperature (1 for greedy samplers).

    Deliberately *without* the top-k / top-p / min-p truncations: this is the policy π_old(token) that RL
    importance ratios compare π_θ against (training recomputes log-probs of the same tempered, untruncated
    distribution), and the per-token log-prob whose mean RPC-style confidence scores use. Truncation would
    make it depend on the sampler knobs and give log-prob 0 to a certain-by-truncation token.
    """
    logits_BV = jnp.asarray(logits_BV, jnp.float32) / logprob_temperature(sampler)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
