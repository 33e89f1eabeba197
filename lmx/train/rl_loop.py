"""One RL step of the GRPO family: rollouts with `generate` (R samples per prompt, the sampler's log-probs kept as
π_old), rewards on the host, group advantages, then μ jitted policy updates (lmx.train.sft.make_train_step with
the policy loss of lmx.train.rl as its LossFn).

The trainer recomputes the completion tokens' log-probs under the same tempered, untruncated distribution the
sampler reports (`completion_logprobs`, f32), so before the first update the importance ratio is exactly 1. The
loss mask covers each completion's tokens up to and including its stop token; padding never enters a loss, mean
or denominator (the token-mean losses divide by the batch's own token count, passed explicitly).

Not here yet (issue 10): the reference model for β > 0, dynamic sampling, TreePO rollouts, the RL entry point,
checkpointed resume of an RL run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmx.decoding import Sampler, generate
from lmx.train import rl

PAD = 0


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """group_size: R samples per prompt (the papers' G); updates_per_rollout: μ policy updates against the same π_old;
    temperature: τ of the sampler and of the trainer's log-probs; loss / advantage: registered names in
    lmx.train.rl, configured by `loss_config` / `advantage_config` (None: the registered defaults)."""

    group_size: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    updates_per_rollout: int = 1
    loss: str = "grpo"
    loss_config: Any = None
    advantage: str = "group_normalized"
    advantage_config: Any = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("group_size", "max_new_tokens", "updates_per_rollout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RLConfig.{name}={value!r} must be an int >= 1")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature={self.temperature!r} must be > 0 (RL samples)")
        rl.get_loss(self.loss), rl.get_advantage(self.advantage)  # unknown names fail here, listing the known


def completion_batch(prompts: list[list[int]], gen, advantages_BR) -> dict[str, np.ndarray]:
    """The update batch (host numpy): for row x = b·R + r, tokens_XS = prompt b + sample r (right-padded),
    prompt_len_X, mask_XT over the completion's tokens (stop token included), old_logprobs_XT (the sampler's) and
    advantages_X."""
    tokens_BRT, lengths_BR = np.asarray(gen.tokens_BRT), np.asarray(gen.lengths_BR)
    B, R, T = tokens_BRT.shape
    P = max(len(p) for p in prompts)
    tokens_XS = np.full((B * R, P + T), PAD, np.int32)
    prompt_len_X = np.repeat(np.array([len(p) for p in prompts], np.int32), R)
    for x in range(B * R):
        b, r = divmod(x, R)
        n = prompt_len_X[x]
        tokens_XS[x, :n] = prompts[b]
        tokens_XS[x, n:n + T] = tokens_BRT[b, r]
    mask_XT = (np.arange(T)[None] < lengths_BR.reshape(-1)[:, None]).astype(np.float32)
    return {"tokens_XS": tokens_XS, "prompt_len_X": prompt_len_X, "mask_XT": mask_XT,
            "old_logprobs_XT": np.asarray(gen.logprobs_BRT, np.float32).reshape(B * R, T),
            "advantages_X": np.asarray(advantages_BR, np.float32).reshape(-1)}


def completion_logprobs(model, params, tokens_XS, prompt_len_X, T: int, temperature: float):
    """log softmax(logits / τ)[token] of each completion token, [X, T] (f32): completion token t of row x sits at
    position prompt_len + t and is predicted by the logits at the position before it."""
    logits_XSV = model.apply({"params": params}, tokens_XS).logits_BTV
    logp_XSV = jax.nn.log_softmax(logits_XSV.astype(jnp.float32) / temperature, axis=-1)
    pos_XT = jnp.clip(prompt_len_X[:, None] - 1 + jnp.arange(T)[None], 0, tokens_XS.shape[1] - 2)
    target_XT = jnp.take_along_axis(tokens_XS, pos_XT + 1, axis=1)
    logp_XTV = jnp.take_along_axis(logp_XSV, pos_XT[..., None], axis=1)
    return jnp.take_along_axis(logp_XTV, target_XT[..., None], axis=-1)[..., 0]


def make_policy_loss(cfg: RLConfig) -> Callable:
    """The LossFn (model, params, batch, rng) -> (loss, metrics) of make_train_step for cfg's policy loss."""
    loss_fn = rl.get_loss(cfg.loss)
    loss_cfg = cfg.loss_config if cfg.loss_config is not None else rl.loss_config(cfg.loss)

    def policy_loss(model, params, batch, rng):
        del rng
        T = batch["mask_XT"].shape[1]
        logp_XT = completion_logprobs(model, params, batch["tokens_XS"], batch["prompt_len_X"], T, cfg.temperature)
        loss, metrics = loss_fn(logp_XT, batch["old_logprobs_XT"], None, batch["advantages_X"], batch["mask_XT"],
                                loss_cfg, num_tokens=jnp.sum(batch["mask_XT"]))
        mask = batch["mask_XT"] > 0
        diff = jnp.where(mask, jnp.abs(jax.lax.stop_gradient(logp_XT) - batch["old_logprobs_XT"]), 0.0)
        return loss, {**metrics, "logprob_diff_max": jnp.max(diff)}

    return policy_loss


def rl_step(state, prompts: list[list[int]], reward_fn, *, model, train_step, cfg: RLConfig):
    """Rollouts -> rewards -> advantages -> μ updates. reward_fn(gen) -> rewards_BR (host numpy; NaN =
    unscorable). Returns (state, metrics: plain floats)."""
    t0 = time.perf_counter()
    key = jax.random.fold_in(state.rng, 1 << 20)  # rollouts: a stream apart from the updates
    gen = generate(model, state.params, prompts, max_new_tokens=cfg.max_new_tokens,
                   sampler=Sampler(temperature=cfg.temperature), rng=jax.random.fold_in(key, state.step),
                   num_samples=cfg.group_size, stop_tokens=cfg.stop_tokens)
    rewards_BR = np.asarray(reward_fn(gen), np.float32)
    want = tuple(gen.lengths_BR.shape)
    if rewards_BR.shape != want:
        raise ValueError(f"reward_fn returned shape {rewards_BR.shape}, expected [B, R] = {want}")
    adv_cfg = cfg.advantage_config if cfg.advantage_config is not None else rl.advantage_config(cfg.advantage)
    advantages_BR, adv_metrics = rl.get_advantage(cfg.advantage)(jnp.asarray(rewards_BR), cfg.group_size, adv_cfg)
    batch = completion_batch(prompts, gen, advantages_BR)
    t1 = time.perf_counter()
    for _ in range(cfg.updates_per_rollout):
        state, metrics = train_step(state, batch)
    metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    lengths = np.asarray(gen.lengths_BR)
    finite = rewards_BR[np.isfinite(rewards_BR)]
    group_std = np.nanstd(rewards_BR, axis=1)
    out = {k: float(v) for k, v in {**metrics, **jax.device_get(adv_metrics)}.items() if np.ndim(v) == 0}
    out |= {"reward_mean": float(finite.mean()) if finite.size else float("nan"),
            "reward_std": float(finite.std()) if finite.size else float("nan"),
            "frac_reward_zero_std": float(np.mean(group_std == 0)),
            "completion_len_mean": float(lengths.mean()), "completion_len_min": float(lengths.min()),
            "completion_len_max": float(lengths.max()),
            "truncated_ratio": float(np.mean(~np.asarray(gen.finished_BR))),
            "rollout_s": t1 - t0, "update_s": t2 - t1, "tokens_per_s": float(lengths.sum()) / max(t2 - t0, 1e-9)}
    return state, out
