"""The GRPO family as pure JAX: policy losses, KL estimators and group advantage estimators.

Everything here is a small pure function of arrays (jit-able; configs are frozen, hashable dataclasses, so
they can be closed over or passed as static arguments). Rollouts, rewards and the trainer live elsewhere.

Shapes (DESIGN §2): X rows = B prompts · R samples per prompt, T completion tokens. `mask_XT[x, t] = 1` marks
a completion token that is trained on (the stop token included); padding never enters a mean, a std or a
denominator, and a value at a masked position never reaches a loss or a gradient (inputs are zeroed there
before any arithmetic, so even ±inf log-probs of padding are harmless).

The importance ratio ρ = π_θ/π_old is computed from the log-probs the caller passes; lmx's sampler returns the
log-probs of the tempered, untruncated distribution, so the trainer must recompute them the same way.

The papers write G for the group size; in code it is `group_size` (the R axis), since G means query heads per KV
head in lmx.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
# loss_fn(logprobs_XT, old_logprobs_XT, ref_logprobs_XT | None, advantages_X, mask_XT, config,
#         *, num_tokens=None, num_seqs=None) -> (scalar loss, metrics)
LossFn = Callable[..., tuple[jax.Array, Metrics]]
# advantage_fn(rewards, group_size=None, config=None, *, valid=None) -> (advantages, metrics). Two registered
# estimators take more: treepo the leaves' `subgroup_ids`; lead two reward streams and its EMA `state`, returning
# (advantages, state, metrics) — lmx.train.rl_loop dispatches on their names.
AdvantageFn = Callable[..., tuple[jax.Array, Metrics]]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-sum-constant")
KL_ESTIMATORS = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------------------------- registries

_LOSSES: dict[str, tuple[LossFn, type]] = {}
_ADVANTAGES: dict[str, tuple[AdvantageFn, type]] = {}


def _register(table: dict, kind: str, name: str, config_cls: type):
    def deco(fn):
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = (fn, config_cls)
        return fn
    return deco


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}")
    return table[name]


def register_loss(name: str, config_cls: type):
    """Decorator: register a policy loss under `name`, configured by the frozen dataclass `config_cls`."""
    return _register(_LOSSES, "policy loss", name, config_cls)


def get_loss(name: str) -> LossFn:
    return _lookup(_LOSSES, "policy loss", name)[0]


def loss_config(name: str, **overrides: Any):
    """The registered loss's config with the paper's defaults, fields replaced by `overrides`."""
    return _lookup(_LOSSES, "policy loss", name)[1](**overrides)


def available_losses() -> list[str]:
    return sorted(_LOSSES)


def register_advantage(name: str, config_cls: type):
    """Decorator: register an advantage estimator under `name`, configured by `config_cls`."""
    return _register(_ADVANTAGES, "advantage estimator", name, config_cls)


def get_advantage(name: str) -> AdvantageFn:
    return _lookup(_ADVANTAGES, "advantage estimator", name)[0]


def advantage_config(name: str, **overrides: Any):
    return _lookup(_ADVANTAGES, "advantage estimator", name)[1](**overrides)


def available_advantages() -> list[str]:
    return sorted(_ADVANTAGES)


# ------------------------------------------------------------------------------------------- masked helpers

def _masked_mean(x, mask):
    return jnp.where(mask, x, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def aggregate(loss_XT, mask_XT, mode: str, *, num_tokens=None, num_seqs=None, max_tokens: int | None = None):
    """Reduce per-token losses to a scalar.

    token-mean           Σ_{x,t} ℓ / N, N = `num_tokens` (the GLOBAL token count of the batch: pass it when this
                         call sees one micro-batch) or the tokens in this call.
    seq-mean-token-mean  1/X' Σ_x (1/|o_x| Σ_t ℓ), X' = `num_seqs` or the rows with ≥ 1 token here (an all-masked
                         row contributes nothing, to the sum or to X').
    seq-sum-constant     Σ_{x,t} ℓ / (X' · MAX_TOKENS), MAX_TOKENS = `max_tokens` or T (Dr.GRPO).
    """
    mask_XT = mask_XT.astype(bool)
    loss_XT = jnp.where(mask_XT, loss_XT, 0.0)
    tokens_X = mask_XT.sum(-1)
    seqs = (tokens_X > 0).sum() if num_seqs is None else num_seqs
    if mode == "token-mean":
        n = mask_XT.sum() if num_tokens is None else num_tokens
        return loss_XT.sum() / jnp.maximum(n, 1)
    if mode == "seq-mean-token-mean":
        return (loss_XT.sum(-1) / jnp.maximum(tokens_X, 1)).sum() / jnp.maximum(seqs, 1)
    if mode == "seq-sum-constant":
        return loss_XT.sum() / (jnp.maximum(seqs, 1) * (max_tokens or loss_XT.shape[-1]))
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")


def kl_divergence(logprobs_XT, ref_logprobs_XT, estimator: str = "k3"):
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman, "Approximating KL divergence").

    With log r = log π_ref − log π_θ:  k1 = −log r,  k2 = ½ (log r)²,  k3 = r − log r − 1 (GRPO's choice).
    Unmasked: multiply or `aggregate` with the mask. k1 is unbiased in value but its gradient in a loss is wrong
    in expectation; k3's gradient is biased unless weighted by the ratio (TRL #4637; `kl_ratio_weighted` of the
    loss configs).
    """
    log_r = ref_logprobs_XT - logprobs_XT
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return jnp.exp(log_r) - log_r - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


# -------------------------------------------------------------------------------------------- policy losses

@dataclasses.dataclass(frozen=True)
class ClipLossConfig:
    """Clipped-surrogate policy loss (PPO/GRPO family).

    ℓ_{i,t} = max(−ρ_{i,t} Â_i, −clip(ρ_{i,t}, 1−ε_low, 1+ε_high) Â_i) + β·KL_t,  ρ = π_θ/π_old.
    eps_low, eps_high: ε_low, ε_high.   dual_clip_c: c of dual-clip PPO (for Â < 0 the loss is capped at −c·Â;
    None = off).   beta: β (needs ref log-probs when > 0).   kl_estimator: "k1" | "k2" | "k3".
    aggregation: one of AGGREGATIONS (see `aggregate`).   max_tokens: MAX_TOKENS of "seq-sum-constant" (None = T).
    kl_ratio_weighted: use ρ·KL_t (ρ = π_θ/π_old, its gradient kept) in place of KL_t. The tokens were sampled
    from π_old, and E_old[ρ·f] = E_θ[f]; with k3 the gradient of E_old[ρ·k3] is exactly ∇KL(π_θ ‖ π_ref), where
    plain k3's gradient is that of the forward KL(π_ref ‖ π_θ) (TRL #4637). Off (the papers' form) by default.
    """
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_ratio_weighted: bool = False
    aggregation: str = "seq-mean-token-mean"
    max_tokens: int | None = None

    def __post_init__(self):
        if not (self.eps_low >= 0 and self.eps_high >= 0):
            raise ValueError(f"clip ranges must be ≥ 0, got ε_low={self.eps_low}, ε_high={self.eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual-clip c must be > 1, got c={self.dual_clip_c}")
        if self.beta < 0:
            raise ValueError(f"KL coefficient β must be ≥ 0, got β={self.beta}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.aggregation!r}; expected one of {AGGREGATIONS}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"MAX_TOKENS must be ≥ 1, got max_tokens={self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ClipLossConfig):
    """GRPO (DeepSeekMath, arXiv 2402.03300): J = E[1/G Σ_i 1/|o_i| Σ_t (min(ρÂ, clip(ρ, 1−ε, 1+ε)Â) − β·KL_t)],
    KL by k3. ε = 0.2; β = 0 here (the paper used 0.04; set beta and pass ref log-probs for it)."""


@dataclasses.dataclass(frozen=True)
class DrGRPOConfig(ClipLossConfig):
    """Dr.GRPO (arXiv 2503.20783): GRPO's surrogate, summed over tokens and divided by the constant G·MAX_TOKENS
    (no 1/|o_i| length bias); pair with the "group_centered" advantage (no std). β = 0. max_tokens = MAX_TOKENS,
    the generation limit (None = the T of the batch)."""
    aggregation: str = "seq-sum-constant"


@dataclasses.dataclass(frozen=True)
class DAPOConfig(ClipLossConfig):
    """DAPO (arXiv 2503.14476): clip-higher, ε_low = 0.2, ε_high = 0.28, token-level mean
    1/Σ_i|o_i| Σ_i Σ_t min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â); no KL (β = 0)."""
    eps_high: float = 0.28
    aggregation: str = "token-mean"


@dataclasses.dataclass(frozen=True)
class GPPOConfig(ClipLossConfig):
    """GPPO (Klear-Reasoner, arXiv 2508.07629): forward equal to clip-higher PPO (ε_low = 0.2, ε_high = 0.28), but a
    clipped token passes the bounded gradient −Â·(1±ε)·∇log π instead of none:
    ρ_c = clamp(ρ, (1−ε_low)/sg(ρ)·ρ, (1+ε_high)/sg(ρ)·ρ). Dual clip c = 10 for Â < 0; token-mean."""
    eps_high: float = 0.28
    dual_clip_c: float | None = 10.0
    aggregation: str = "token-mean"


@dataclasses.dataclass(frozen=True)
class GSPOConfig(ClipLossConfig):
    """GSPO (arXiv 2507.18071): sequence ratio s_i = exp(1/|o_i| Σ_t log ρ_{i,t}),
    J = 1/G Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i), ε_low = 3e-4, ε_high = 4e-4, no KL.
    token_form: GSPO-token, log s_{i,t} = log π_t − sg(log π_t) + sg(log s_i) — same value and, for a sequence-level
    Â_i, the same gradient; it exists for per-token advantages (advantages_XT)."""
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    token_form: bool = False


def _prepare(logprobs_XT, old_logprobs_XT, ref_logprobs_XT, advantages, mask_XT, config):
    """Zero every input at masked positions (so padding cannot leak NaN/inf into values or gradients) and
    broadcast the advantages to [X, T]."""
    if config.beta > 0 and ref_logprobs_XT is None:
        raise ValueError(f"KL coefficient β={config.beta} > 0 needs ref_logprobs_XT (a reference model); got None")
    mask_XT = mask_XT.astype(bool)
    zero = lambda a: None if a is None else jnp.where(mask_XT, a.astype(jnp.float32), 0.0)  # noqa: E731
    advantages = advantages.astype(jnp.float32)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    adv_XT = jnp.broadcast_to(advantages, mask_XT.shape)
    return (zero(logprobs_XT), zero(old_logprobs_XT), zero(ref_logprobs_XT), zero(adv_XT), mask_XT)


def _surrogate(ratio_XT, clipped_XT, adv_XT, config):
    """Per-token clipped surrogate (a loss: minimised) and its clip indicators."""
    loss_XT = jnp.maximum(-adv_XT * ratio_XT, -adv_XT * clipped_XT)
    r = jax.lax.stop_gradient(ratio_XT)
    metrics_XT = {"clip_frac_low": (r < 1 - config.eps_low) & (adv_XT < 0),
                  "clip_frac_high": (r > 1 + config.eps_high) & (adv_XT > 0)}
    if config.dual_clip_c is not None:
        capped_XT = -adv_XT * config.dual_clip_c
        metrics_XT["dual_clip_frac"] = (adv_XT < 0) & (loss_XT > capped_XT)
        loss_XT = jnp.where(adv_XT < 0, jnp.minimum(loss_XT, capped_XT), loss_XT)
    return loss_XT, metrics_XT


def _finish(pg_XT, metrics_XT, logprobs_XT, ref_logprobs_XT, ratio_XT, mask_XT, config, num_tokens, num_seqs,
            old_logprobs_XT=None):
    """Add β·KL, aggregate, and reduce the per-token metrics over the mask."""
    agg = lambda a: aggregate(a, mask_XT, config.aggregation, num_tokens=num_tokens,  # noqa: E731
                              num_seqs=num_seqs, max_tokens=config.max_tokens)
    loss_XT, metrics = pg_XT, {}
    if ref_logprobs_XT is not None:
        kl_XT = kl_divergence(logprobs_XT, ref_logprobs_XT, config.kl_estimator)
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl_XT), mask_XT)
        if config.kl_ratio_weighted:  # the per-token ratio to π_old (also under GSPO's sequence ratio)
            kl_XT = jnp.exp(logprobs_XT - jax.lax.stop_gradient(old_logprobs_XT)) * kl_XT
        if config.beta > 0:
            loss_XT = loss_XT + config.beta * kl_XT
    loss = agg(loss_XT)
    r = jax.lax.stop_gradient(ratio_XT)
    metrics |= {k: _masked_mean(v, mask_XT) for k, v in metrics_XT.items()}
    metrics |= {"pg_loss": jax.lax.stop_gradient(agg(pg_XT)), "ratio_mean": _masked_mean(r, mask_XT),
                "ratio_max": jnp.where(mask_XT, r, 0.0).max(),
                # E[−log π_θ(y_t)] over sampled tokens: a one-sample entropy estimate when sampling is on-policy
                "entropy_estimate": _masked_mean(-jax.lax.stop_gradient(logprobs_XT), mask_XT),
                "tokens": mask_XT.sum().astype(jnp.float32)}
    return loss, metrics


def _token_clip_loss(bounded_grad: bool):
    def loss_fn(logprobs_XT, old_logprobs_XT, ref_logprobs_XT, advantages_X, mask_XT, config,
                *, num_tokens=None, num_seqs=None):
        logp, old, ref, adv, mask = _prepare(logprobs_XT, old_logprobs_XT, ref_logprobs_XT, advantages_X,
                                             mask_XT, config)
        log_ratio = logp - old
        ratio = jnp.exp(log_ratio)
        lo, hi = 1 - config.eps_low, 1 + config.eps_high
        if bounded_grad:  # GPPO: value of clip(ρ), gradient (1±ε)·∇log π through the clipped tokens
            unit = jnp.exp(log_ratio - jax.lax.stop_gradient(log_ratio))  # ρ/sg(ρ) without dividing by ρ
            r = jax.lax.stop_gradient(ratio)
            clipped = jnp.where(r < lo, lo * unit, jnp.where(r > hi, hi * unit, ratio))
        else:
            clipped = jnp.clip(ratio, lo, hi)
        pg, metrics_XT = _surrogate(ratio, clipped, adv, config)
        return _finish(pg, metrics_XT, logp, ref, ratio, mask, config, num_tokens, num_seqs, old)
    return loss_fn


grpo_loss = register_loss("grpo", GRPOConfig)(_token_clip_loss(bounded_grad=False))
dr_grpo_loss = register_loss("dr_grpo", DrGRPOConfig)(_token_clip_loss(bounded_grad=False))
dapo_loss = register_loss("dapo", DAPOConfig)(_token_clip_loss(bounded_grad=False))
gppo_loss = register_loss("gppo", GPPOConfig)(_token_clip_loss(bounded_grad=True))


@register_loss("gspo", GSPOConfig)
def gspo_loss(logprobs_XT, old_logprobs_XT, ref_logprobs_XT, advantages_X, mask_XT, config,
              *, num_tokens=None, num_seqs=None):
    """GSPO: one clipped ratio per sequence; see GSPOConfig. The per-sequence loss is spread over the sequence's
    tokens, so the default seq-mean-token-mean aggregation gives the paper's 1/G Σ_i."""
    if advantages_X.ndim != 1 and not config.token_form:
        raise ValueError(f"sequence-form GSPO needs one advantage per row (advantages_X), got shape "
                         f"{advantages_X.shape}; set token_form=True for per-token advantages")
    logp, old, ref, adv, mask = _prepare(logprobs_XT, old_logprobs_XT, ref_logprobs_XT, advantages_X, mask_XT,
                                         config)
    log_s_X = (logp - old).sum(-1) / jnp.maximum(mask.sum(-1), 1)
    if config.token_form:
        ratio = jnp.exp(logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(log_s_X)[:, None])
    else:
        ratio = jnp.broadcast_to(jnp.exp(log_s_X)[:, None], mask.shape)
    clipped = jnp.clip(ratio, 1 - config.eps_low, 1 + config.eps_high)
    pg, metrics_XT = _surrogate(ratio, clipped, adv, config)
    return _finish(pg, metrics_XT, logp, ref, ratio, mask, config, num_tokens, num_seqs, old)


# --------------------------------------------------------------------------------------- advantage estimators

@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """GRPO's outcome advantage Â_i = (r_i − mean(r)) / (std(r) + ε) over each group of G samples of one prompt.
    eps: ε = 1e-6.   unbiased_std: std with Bessel's correction (torch.std, as verl and TRL compute it).
    A group with a single scorable sample uses mean 0, std 1 (verl's singleton rule: Â = r)."""
    eps: float = 1e-6
    unbiased_std: bool = True


@dataclasses.dataclass(frozen=True)
class GroupCenteredConfig:
    """Dr.GRPO's advantage Â_i = r_i − mean(r) over each group of G (no division by the std)."""


def _group(rewards, group_size: int | None, valid):
    """Rewards (and validity) as [B, R]; checks the group size. NaN rewards are unscorable (invalid)."""
    rewards = jnp.asarray(rewards)
    if rewards.ndim == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"rewards_BR has {rewards.shape[1]} samples per prompt but group size G={group_size}")
        group_size = rewards.shape[1]
    elif rewards.ndim == 1:
        if group_size is None:
            raise ValueError("flat rewards_X need the group size G (samples per prompt); got group_size=None")
        if group_size >= 1 and rewards.shape[0] % group_size:
            raise ValueError(f"batch of {rewards.shape[0]} rewards is not divisible into groups of G={group_size}")
    else:
        raise ValueError(f"rewards must be [B, R] or flat [B·R], got shape {rewards.shape}")
    if group_size < 2:
        raise ValueError(f"group advantages need group size G ≥ 2 samples per prompt, got G={group_size}")
    rewards_BR = rewards.astype(jnp.float32).reshape(-1, group_size)
    valid_BR = ~jnp.isnan(rewards_BR)
    unscorable = (~valid_BR).sum()
    if valid is not None:
        valid_BR = valid_BR & jnp.asarray(valid, bool).reshape(rewards_BR.shape)
        unscorable = (jnp.isnan(rewards_BR) & jnp.asarray(valid, bool).reshape(rewards_BR.shape)).sum()
    return jnp.where(valid_BR, rewards_BR, 0.0), valid_BR, unscorable, rewards.shape


def _group_advantages(rewards, group_size, valid, scale, eps, ddof):
    r_BR, valid_BR, unscorable, shape = _group(rewards, group_size, valid)
    n_B1 = valid_BR.sum(-1, keepdims=True)
    mean_B1 = r_BR.sum(-1, keepdims=True) / jnp.maximum(n_B1, 1)
    dev_BR = jnp.where(valid_BR, r_BR - mean_B1, 0.0)
    # all scorable rewards equal (max == min): exactly 0, not a rounding residue over ε
    zero_std_B1 = (jnp.where(valid_BR, r_BR, -jnp.inf).max(-1, keepdims=True)
                   == jnp.where(valid_BR, r_BR, jnp.inf).min(-1, keepdims=True))
    std_B1 = jnp.sqrt((dev_BR**2).sum(-1, keepdims=True) / jnp.maximum(n_B1 - ddof, 1))
    singleton_B1 = n_B1 == 1  # verl: mean 0, std 1
    if scale:
        adv_BR = jnp.where(singleton_B1, r_BR, dev_BR / (std_B1 + eps))
    else:
        adv_BR = jnp.where(singleton_B1, r_BR, dev_BR)
    adv_BR = jnp.where(valid_BR & (singleton_B1 | ~zero_std_B1), adv_BR, 0.0)
    groups = (n_B1 > 0).sum()
    metrics = {"unscorable": unscorable.astype(jnp.float32),
               "frac_reward_zero_std": ((n_B1 > 1) & zero_std_B1).sum() / jnp.maximum(groups, 1),
               "reward_mean": _masked_mean(r_BR, valid_BR),
               "reward_std": jnp.sqrt(_masked_mean((r_BR - _masked_mean(r_BR, valid_BR))**2, valid_BR)),
               "advantage_mean": _masked_mean(adv_BR, valid_BR),
               "advantage_std": jnp.sqrt(_masked_mean((adv_BR - _masked_mean(adv_BR, valid_BR))**2, valid_BR))}
    return adv_BR.reshape(shape), metrics


@register_advantage("group_normalized", GroupNormConfig)
def group_normalized_advantages(rewards, group_size: int | None = None, config: GroupNormConfig | None = None,
                                *, valid=None):
    """GRPO advantages (see GroupNormConfig) for rewards_BR, or flat rewards_X in groups of `group_size`.

    Returns (advantages in the rewards' shape, metrics). A NaN reward is unscorable: advantage 0, excluded from its
    group's mean and std, counted in metrics["unscorable"]. `valid` (same shape, bool) marks padded samples/groups
    the same way without counting them. A zero-variance group gets advantage 0 (frac_reward_zero_std)."""
    config = config or GroupNormConfig()
    return _group_advantages(rewards, group_size, valid, True, config.eps, int(config.unbiased_std))


@register_advantage("group_centered", GroupCenteredConfig)
def group_centered_advantages(rewards, group_size: int | None = None, config: GroupCenteredConfig | None = None,
                              *, valid=None):
    """Dr.GRPO advantages r_i − mean(r); same shapes, NaN and padding rules as `group_normalized_advantages`."""
    return _group_advantages(rewards, group_size, valid, False, 0.0, 1)


@dataclasses.dataclass(frozen=True)
class TreePOConfig:
    """TreePO's subgroup advantage (arXiv 2508.17445). Leaf i of a prompt's segment tree, with reward r_i:
    Â_i = 1/|D_i| Σ_{d ∈ D_i} (r_i − mean{r_j : leaf j shares i's prefix up to depth d}),
    D_i = {0} ∪ {d > 0 : that subgroup has > 1 scorable leaf}; depth 0 is the whole group of G leaves.
    whiten: then (Â − mean Â)/(std Â + ε) over the batch's scorable leaves. eps: ε. unbiased_std: Bessel's std.
    lmx's choice (not the paper's): a zero-variance group keeps Â = 0 after whitening — it carries no signal."""
    eps: float = 1e-6
    unbiased_std: bool = True
    whiten: bool = True


@register_advantage("treepo", TreePOConfig)
def treepo_advantages(rewards, group_size: int | None = None, config: TreePOConfig | None = None,
                      *, subgroup_ids, valid=None):
    """TreePO advantages (see TreePOConfig). `subgroup_ids` has the rewards' shape plus a trailing depth axis
    (depths 1, 2, ...; depth 0 is implied by the group): leaves of one prompt with equal ids at depth d share their
    prefix up to d. Ids only need to be distinct within a prompt's group. NaN / `valid` as in
    `group_normalized_advantages`. Pairwise within each group: O(B·G²·depths)."""
    config = config or TreePOConfig()
    r_BR, valid_BR, unscorable, shape = _group(rewards, group_size, valid)
    ids = jnp.asarray(subgroup_ids).reshape(r_BR.shape + (-1,))
    # same[b, i, j, d]: scorable leaf j is in leaf i's subgroup at depth d (depth 0: the whole group)
    same_BRRd = jnp.concatenate([jnp.ones(ids.shape[:2] + (ids.shape[1], 1), bool),
                                 ids[:, :, None, :] == ids[:, None, :, :]], axis=-1) & valid_BR[:, None, :, None]
    n_BRd = same_BRRd.sum(2)
    mean_BRd = jnp.where(same_BRRd, r_BR[:, None, :, None], 0.0).sum(2) / jnp.maximum(n_BRd, 1)
    use_BRd = (n_BRd > 1).at[..., 0].set(True)
    adv_BR = jnp.where(use_BRd, r_BR[..., None] - mean_BRd, 0.0).sum(-1) / use_BRd.sum(-1)
    zero_std_B1 = (jnp.where(valid_BR, r_BR, -jnp.inf).max(-1, keepdims=True)
                   == jnp.where(valid_BR, r_BR, jnp.inf).min(-1, keepdims=True))
    keep_BR = valid_BR & ~zero_std_B1
    adv_BR = jnp.where(keep_BR, adv_BR, 0.0)
    if config.whiten:
        n = keep_BR.sum()
        mean = jnp.where(keep_BR, adv_BR, 0.0).sum() / jnp.maximum(n, 1)
        dev = jnp.where(keep_BR, adv_BR - mean, 0.0)
        std = jnp.sqrt((dev**2).sum() / jnp.maximum(n - int(config.unbiased_std), 1))
        adv_BR = jnp.where(keep_BR, dev / (std + config.eps), 0.0)
    n_B1 = valid_BR.sum(-1, keepdims=True)
    metrics = {"unscorable": unscorable.astype(jnp.float32),
               "frac_reward_zero_std": ((n_B1 > 1) & zero_std_B1).sum() / jnp.maximum((n_B1 > 0).sum(), 1),
               "reward_mean": _masked_mean(r_BR, valid_BR),
               "advantage_mean": _masked_mean(adv_BR, valid_BR),
               "advantage_std": jnp.sqrt(_masked_mean((adv_BR - _masked_mean(adv_BR, valid_BR))**2, valid_BR))}
    return adv_BR.reshape(shape), metrics


@dataclasses.dataclass(frozen=True)
class LEADConfig:
    """LEAD's two-stream advantage with Potential-Scaled Instability weights (arXiv 2605.09806).

    A_c, A_e: the correctness and efficiency rewards (R_eff, from lmx.train.rewards), each group-normalised.
    Pooled over the batch each step: μ_c, σ_c of the correctness rewards; μ_e, σ_e of R_eff over the correct
    rollouts only. CV_k = σ_k/(|μ_k| + ε), CV'_k = CV_k/(CV_c + CV_e); Φ_c = (1 − clip(μ_c, 0, 1))^α,
    Φ_e = (1 − (clip(μ_e, −1, 1) + 1)/2)^α; D_k = CV'_k·Φ_k; target w_c = D_c/(D_c + D_e);
    EMA w ← β_ema·w + (1 − β_ema)·target, from w = 0.5; w_c = max(w, λ_min), w_e = 1 − w_c;
    A = whiten(w_c·A_c + w_e·A_e) over the batch.
    alpha: α = 1.  ema: β_ema = 0.95.  lambda_min: λ_min = 0.3.  eps: ε.  correct_threshold: a rollout is correct
    when its correctness reward is ≥ this.
    lmx's choices where the spec is silent: pooled σ are population stds; the EMA state stores the unfloored w
    (λ_min applies to the weight used); when D_c + D_e = 0 the EMA keeps its value; whitening uses Bessel's std;
    a group with constant correctness and efficiency rewards keeps A = 0 after whitening.
    """
    alpha: float = 1.0
    ema: float = 0.95
    lambda_min: float = 0.3
    eps: float = 1e-6
    correct_threshold: float = 1.0


def lead_init_state() -> dict[str, jax.Array]:
    """LEAD's EMA state (a pytree, checkpointed with the rest of an RL run)."""
    return {"w_c": jnp.asarray(0.5, jnp.float32)}


@register_advantage("lead", LEADConfig)
def lead_advantages(correctness, efficiency, group_size: int | None = None, config: LEADConfig | None = None,
                    *, state: dict[str, jax.Array], valid=None):
    """LEAD advantages (see LEADConfig): returns (advantages in the rewards' shape, new state, metrics).
    Registered as "lead", with its own signature: two reward streams in, and the EMA state carried across steps."""
    config = config or LEADConfig()
    if valid is not None:
        valid = jnp.asarray(valid, bool)
    c_BR, valid_c_BR, _, shape = _group(correctness, group_size, valid)
    e_BR, valid_e_BR, _, _ = _group(efficiency, group_size, valid)
    valid_BR = valid_c_BR & valid_e_BR
    padded_BR = jnp.ones(c_BR.shape, bool) if valid is None else valid.reshape(c_BR.shape)
    unscorable = (padded_BR & ~valid_BR).sum()  # a NaN in either stream makes the rollout unscorable
    a_c, _ = group_normalized_advantages(c_BR, valid=valid_BR)
    a_e, _ = group_normalized_advantages(e_BR, valid=valid_BR)

    def pooled(x, m):
        mu = _masked_mean(x, m)
        return mu, jnp.sqrt(_masked_mean((x - mu) ** 2, m))

    correct_BR = valid_BR & (c_BR >= config.correct_threshold)
    (mu_c, sd_c), (mu_e, sd_e) = pooled(c_BR, valid_BR), pooled(e_BR, correct_BR)
    cv_c, cv_e = sd_c / (jnp.abs(mu_c) + config.eps), sd_e / (jnp.abs(mu_e) + config.eps)
    cv_sum = jnp.maximum(cv_c + cv_e, config.eps)
    phi_c = (1 - jnp.clip(mu_c, 0, 1)) ** config.alpha
    phi_e = (1 - (jnp.clip(mu_e, -1, 1) + 1) / 2) ** config.alpha
    d_c, d_e = cv_c / cv_sum * phi_c, cv_e / cv_sum * phi_e
    w = state["w_c"]
    target = jnp.where(d_c + d_e > 0, d_c / jnp.where(d_c + d_e > 0, d_c + d_e, 1.0), w)
    w = config.ema * w + (1 - config.ema) * target
    w_c = jnp.maximum(w, config.lambda_min)
    a_BR = w_c * a_c + (1 - w_c) * a_e
    keep_BR = valid_BR & ((a_c != 0) | (a_e != 0))
    n = keep_BR.sum()
    mean = jnp.where(keep_BR, a_BR, 0.0).sum() / jnp.maximum(n, 1)
    dev = jnp.where(keep_BR, a_BR - mean, 0.0)
    adv_BR = dev / (jnp.sqrt((dev**2).sum() / jnp.maximum(n - 1, 1)) + config.eps)
    metrics = {"lead_w_c": w_c, "lead_target_w_c": target, "unscorable": unscorable.astype(jnp.float32),
               "advantage_mean": _masked_mean(adv_BR, valid_BR)}
    return adv_BR.reshape(shape), {"w_c": w.astype(jnp.float32)}, metrics
