"""One RL step of the GRPO family: rollouts with `generate` (R samples per prompt, the sampler's log-probs kept as
π_old), rewards on the host, group advantages, then μ jitted policy updates (lmx.train.sft.make_train_step with
the policy loss of lmx.train.rl as its LossFn).

The trainer recomputes the completion tokens' log-probs under the same tempered, untruncated distribution the
sampler reports (`completion_logprobs`, f32), so before the first update the importance ratio is exactly 1. The
loss mask covers each completion's tokens up to and including its stop token; padding never enters a loss, mean
or denominator (the token-mean losses divide by the batch's own token count, passed explicitly).

Dynamic sampling (DAPO, `RLConfig.dynamic_rounds` > 1): groups whose scorable rewards are all equal carry no
signal and are dropped; further generation rounds on fresh prompts (`refill(round) -> (prompts, reward_fn)`)
fill the freed group slots, up to `dynamic_rounds` rounds in all. When the bound is hit the step trains on the
groups it has: empty slots are masked out (no token, advantage 0), and `dynamic_bound_hit` is logged; a step with
no informative group at all applies a zero-gradient update, never an error.

KL to a reference policy: a loss config with β > 0 needs `ref_params` (a frozen copy of the starting policy);
their log-probs of the completions are computed once per rollout, like π_old's, and passed to the loss.

TreePO (`RLConfig.tree`, `advantage="treepo"`): the rollouts are lmx.train.treepo's segment trees; a tree's
duplicate leaves (all of a prompt's branches finished early) are emptied rows, like dynamic sampling's empty slots.

The RL run (prompts from a task, verifier rewards, metrics, checkpoints with exact resume) is lmx.train.rl_train.
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
from lmx.train.treepo import TreeConfig, tree_rollout

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
    dynamic_rounds: int = 1  # DAPO dynamic sampling: generation rounds per step (1: off)
    micro_batches: int = 1  # gradient accumulation: each update sums the gradients of this many row slices
    tree: TreeConfig | None = None  # TreePO segment-tree rollouts (lmx.train.treepo) in place of R independent ones

    def __post_init__(self):
        for name in ("group_size", "max_new_tokens", "updates_per_rollout", "dynamic_rounds", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RLConfig.{name}={value!r} must be an int >= 1")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature={self.temperature!r} must be > 0 (RL samples)")
        rl.get_loss(self.loss), rl.get_advantage(self.advantage)  # unknown names fail here, listing the known
        if self.tree is not None:
            if not isinstance(self.tree, TreeConfig):
                raise TypeError(f"RLConfig.tree must be a lmx.train.treepo.TreeConfig, got {self.tree!r}")
            if (self.tree.num_leaves, self.tree.max_new_tokens) != (self.group_size, self.max_new_tokens):
                raise ValueError(f"RLConfig.tree has G={self.tree.num_leaves} leaves and max_new_tokens="
                                 f"{self.tree.max_new_tokens}, but group_size={self.group_size} and max_new_tokens="
                                 f"{self.max_new_tokens}: they must agree")
        if self.advantage == "treepo" and self.tree is None:
            raise ValueError("RLConfig.advantage='treepo' needs the tree rollouts' subgroup ids: set RLConfig.tree "
                             "(a TreeConfig)")


PROMPT_BUCKET = 16  # prompt widths are padded to a multiple of this: few distinct batch shapes, few compilations


@dataclasses.dataclass
class Groups:
    """The groups of one update batch, host numpy, one entry per group slot (B slots of R samples)."""

    prompts: list  # token-id lists; [] for an empty slot
    tokens_BRT: np.ndarray
    lengths_BR: np.ndarray  # 0 for an empty slot
    logprobs_BRT: np.ndarray
    rewards_BRS: np.ndarray  # S reward streams (1; LEAD: 2); 0 for an empty slot
    subgroup_ids_BRd: np.ndarray  # tree rollouts: the leaves' ancestors per depth (d = 0 without a tree)

    @classmethod
    def of(cls, prompts, gen, rewards_BRS, subgroup_ids_BRd=None, valid_BR=None):
        """valid_BR False (a tree's duplicate leaves) empties a row: length 0, so no loss, mean or advantage."""
        lengths_BR = np.asarray(gen.lengths_BR)
        if valid_BR is not None:
            lengths_BR = np.where(np.asarray(valid_BR), lengths_BR, 0)
        if subgroup_ids_BRd is None:
            subgroup_ids_BRd = np.zeros(lengths_BR.shape + (0,), np.int32)
        return cls(list(prompts), np.asarray(gen.tokens_BRT), lengths_BR, np.asarray(gen.logprobs_BRT, np.float32),
                   np.asarray(rewards_BRS, np.float32), np.asarray(subgroup_ids_BRd, np.int32))

    def take(self, idx) -> Groups:
        idx = list(idx)
        return Groups([self.prompts[i] for i in idx], *(a[idx] for a in dataclasses.astuple(self)[1:]))

    def __add__(self, other: Groups) -> Groups:
        return Groups(self.prompts + other.prompts, *(np.concatenate([a, b]) for a, b in
                                                      zip(dataclasses.astuple(self)[1:],
                                                          dataclasses.astuple(other)[1:], strict=True)))

    def padded(self, B: int) -> Groups:
        """Up to B slots, the missing ones empty (masked out)."""
        n = len(self.prompts)
        pad = lambda a, fill: np.concatenate([a, np.full((B - n, *a.shape[1:]), fill, a.dtype)])  # noqa: E731
        return Groups(self.prompts + [[]] * (B - n), pad(self.tokens_BRT, PAD), pad(self.lengths_BR, 0),
                      pad(self.logprobs_BRT, 0.0), pad(self.rewards_BRS, 0.0), pad(self.subgroup_ids_BRd, 0))


def completion_batch(prompts: list[list[int]], gen, advantages_BR) -> dict[str, np.ndarray]:
    """The update batch (host numpy): for row x = b·R + r, tokens_XS = prompt b + sample r (right-padded),
    prompt_len_X, mask_XT over the completion's tokens (stop token included), old_logprobs_XT (the sampler's) and
    advantages_X."""
    return groups_batch(Groups.of(prompts, gen, np.zeros(np.shape(gen.lengths_BR) + (1,))), advantages_BR)


def groups_batch(g: Groups, advantages_BR) -> dict[str, np.ndarray]:
    B, R, T = g.tokens_BRT.shape
    P = max(1, -(-max(len(p) for p in g.prompts) // PROMPT_BUCKET) * PROMPT_BUCKET)
    tokens_XS = np.full((B * R, P + T), PAD, np.int32)
    # An empty slot's "prompt" is one pad token, so every row has a position to predict from (masked anyway).
    prompt_len_X = np.repeat(np.array([max(len(p), 1) for p in g.prompts], np.int32), R)
    for x in range(B * R):
        b, r = divmod(x, R)
        n = prompt_len_X[x]
        tokens_XS[x, :len(g.prompts[b])] = g.prompts[b]
        tokens_XS[x, n:n + T] = g.tokens_BRT[b, r]
    mask_XT = (np.arange(T)[None] < g.lengths_BR.reshape(-1)[:, None]).astype(np.float32)
    return {"tokens_XS": tokens_XS, "prompt_len_X": prompt_len_X, "mask_XT": mask_XT,
            "old_logprobs_XT": np.where(mask_XT > 0, g.logprobs_BRT.reshape(B * R, T), 0.0).astype(np.float32),
            "advantages_X": np.asarray(advantages_BR, np.float32).reshape(-1)}


def completion_logprobs(model, params, tokens_XS, prompt_len_X, T: int, temperature: float):
    """log softmax(logits / τ)[token] of each completion token, [X, T] (f32): completion token t of row x sits at
    position prompt_len + t and is predicted by the logits at the position before it. The LM head runs only at
    those T positions (not the prompt's), and the log-prob is z[token] − logsumexp(z): no [X, T, V] log-softmax
    is stored, and the token's logit is a one-hot reduction (its gradient a broadcast, not a scatter)."""
    pos_XT = jnp.clip(prompt_len_X[:, None] - 1 + jnp.arange(T)[None], 0, tokens_XS.shape[1] - 2)
    target_XT = jnp.take_along_axis(tokens_XS, pos_XT + 1, axis=1)
    z_XTV = model.apply({"params": params}, tokens_XS, logits_at_B=pos_XT).logits_BTV.astype(jnp.float32)
    z_XTV = z_XTV / temperature
    picked_XT = jnp.sum(z_XTV * jax.nn.one_hot(target_XT, z_XTV.shape[-1], dtype=z_XTV.dtype), axis=-1)
    return picked_XT - jax.nn.logsumexp(z_XTV, axis=-1)


def make_policy_loss(cfg: RLConfig) -> Callable:
    """The LossFn (model, params, batch, rng) -> (loss, metrics) of make_train_step for cfg's policy loss."""
    loss_fn = rl.get_loss(cfg.loss)
    loss_cfg = cfg.loss_config if cfg.loss_config is not None else rl.loss_config(cfg.loss)

    def policy_loss(model, params, batch, rng):
        del rng
        T = batch["mask_XT"].shape[1]
        logp_XT = completion_logprobs(model, params, batch["tokens_XS"], batch["prompt_len_X"], T, cfg.temperature)
        # Under gradient accumulation the batch carries the whole batch's token and sequence counts, so each
        # micro-batch's loss is its share of the whole-batch loss (they sum to it; so do the gradients).
        loss, metrics = loss_fn(logp_XT, batch["old_logprobs_XT"], batch.get("ref_logprobs_XT"),
                                batch["advantages_X"], batch["mask_XT"], loss_cfg,
                                num_tokens=batch.get("num_tokens", jnp.sum(batch["mask_XT"])),
                                num_seqs=batch.get("num_seqs"))
        mask = batch["mask_XT"] > 0
        diff = jnp.where(mask, jnp.abs(jax.lax.stop_gradient(logp_XT) - batch["old_logprobs_XT"]), 0.0)
        return loss, {**metrics, "logprob_diff_max": jnp.max(diff)}

    return policy_loss


def _rollout(state, prompts, reward_fn, *, model, cfg: RLConfig, round_: int):
    """One generation round: (Groups, Generation)."""
    key = jax.random.fold_in(state.rng, 1 << 20)  # rollouts: a stream apart from the updates
    rng, sampler = jax.random.fold_in(jax.random.fold_in(key, state.step), round_), Sampler(cfg.temperature)
    ids = valid = None
    if cfg.tree is None:
        gen = generate(model, state.params, prompts, max_new_tokens=cfg.max_new_tokens, sampler=sampler, rng=rng,
                       num_samples=cfg.group_size, stop_tokens=cfg.stop_tokens)
    else:
        gen, ids, valid = tree_rollout(model, state.params, prompts, cfg=cfg.tree, sampler=sampler, rng=rng,
                                       stop_tokens=cfg.stop_tokens)
    out = reward_fn(gen)
    streams = [np.asarray(r, np.float32) for r in (out if isinstance(out, tuple) else (out,))]
    want, S = tuple(gen.lengths_BR.shape), 2 if cfg.advantage == "lead" else 1
    for r in streams:
        if r.shape != want:
            raise ValueError(f"reward_fn returned shape {r.shape}, expected [B, R] = {want}")
    if len(streams) != S:
        raise ValueError(f"advantage {cfg.advantage!r} takes {S} reward stream(s) per rollout; reward_fn returned "
                         f"{len(streams)}" + (" (LEAD: a tuple (correctness_BR, efficiency_BR))" if S == 2 else ""))
    return Groups.of(prompts, gen, np.stack(streams, -1), ids, valid), gen


def informative(rewards_BRS) -> np.ndarray:
    """Groups with ≥ 2 scorable rollouts whose rewards are not all equal in some stream (DAPO keeps only these).
    rewards_BR or rewards_BRS; a rollout is scorable when all its streams are finite."""
    r = np.asarray(rewards_BRS)
    r = r[..., None] if r.ndim == 2 else r
    finite_BR = np.isfinite(r).all(-1)
    hi = np.where(finite_BR[..., None], r, -np.inf).max(1)
    lo = np.where(finite_BR[..., None], r, np.inf).min(1)
    return (finite_BR.sum(1) >= 2) & (hi > lo).any(-1)


def advantages(cfg: RLConfig, groups: Groups, adv_state=None):
    """The configured estimator on the step's final groups (batch-level statistics — LEAD's pooled weights, TreePO
    whitening — see exactly the rollouts trained on; empty slots and a tree's duplicate leaves are invalid).
    Returns (advantages_BR, metrics, new adv_state)."""
    adv_cfg = cfg.advantage_config if cfg.advantage_config is not None else rl.advantage_config(cfg.advantage)
    fn, r, valid_BR = rl.get_advantage(cfg.advantage), jnp.asarray(groups.rewards_BRS), groups.lengths_BR > 0
    if cfg.advantage == "lead":
        adv_BR, adv_state, metrics = fn(r[..., 0], r[..., 1], cfg.group_size, adv_cfg, state=adv_state,
                                        valid=valid_BR)
        return adv_BR, metrics, adv_state
    extra = {"subgroup_ids": groups.subgroup_ids_BRd} if cfg.advantage == "treepo" else {}
    adv_BR, metrics = fn(r[..., 0], cfg.group_size, adv_cfg, valid=valid_BR, **extra)
    return adv_BR, metrics, adv_state


_ref_logprobs = jax.jit(completion_logprobs, static_argnums=(0, 4, 5))


def rl_step(state, prompts: list[list[int]], reward_fn, *, model, train_step, cfg: RLConfig, refill=None,
            ref_params=None, adv_state=None):
    """Rollouts -> rewards -> advantages -> μ updates. reward_fn(gen) -> rewards_BR (host numpy; NaN =
    unscorable), or for LEAD (cfg.advantage="lead") the tuple (correctness_BR, efficiency_BR). With
    cfg.dynamic_rounds > 1, `refill(round) -> (prompts, reward_fn)` supplies the fresh prompts of each further
    round (module docstring). ref_params: the reference policy, required when the loss's β > 0.
    Returns (state, metrics: plain floats); with LEAD (state, metrics, adv_state): its EMA state, which the
    caller passes back next step (start from `rl.lead_init_state()`)."""
    beta = getattr(cfg.loss_config if cfg.loss_config is not None else rl.loss_config(cfg.loss), "beta", 0.0)
    if beta > 0 and ref_params is None:
        raise ValueError(f"the {cfg.loss} loss has KL coefficient β={beta} > 0: pass ref_params (the reference "
                         f"policy) to rl_step")
    stateful = cfg.advantage == "lead"
    if stateful and adv_state is None:
        raise ValueError("the 'lead' advantage carries an EMA across steps: pass adv_state (start from "
                         "lmx.train.rl.lead_init_state()) and keep the one rl_step returns")
    t0 = time.perf_counter()
    B = len(prompts)
    groups, gen = _rollout(state, prompts, reward_fn, model=model, cfg=cfg, round_=0)
    all_rewards, rounds = [groups.rewards_BRS], 1
    if cfg.dynamic_rounds > 1:
        if refill is None:
            raise ValueError(f"RLConfig.dynamic_rounds={cfg.dynamic_rounds} needs a refill(round) callable")
        groups = groups.take(np.flatnonzero(informative(groups.rewards_BRS)))
        while len(groups.prompts) < B and rounds < cfg.dynamic_rounds:
            more, more_reward_fn = refill(rounds)
            new, _ = _rollout(state, more, more_reward_fn, model=model, cfg=cfg, round_=rounds)
            keep = np.flatnonzero(informative(new.rewards_BRS))[: B - len(groups.prompts)]
            groups = groups + new.take(keep)
            all_rewards.append(new.rewards_BRS)
            rounds += 1
        filled = len(groups.prompts)
        groups = groups.padded(B)
    advantages_BR, adv_metrics, adv_state = advantages(cfg, groups, adv_state)
    batch = groups_batch(groups, advantages_BR)
    if cfg.micro_batches > 1:
        X = batch["mask_XT"].shape[0]
        if X % cfg.micro_batches:
            raise ValueError(f"RLConfig.micro_batches={cfg.micro_batches} does not divide the {X} rows (B·G) of "
                             "the update batch")
        batch["num_tokens"] = np.float32(batch["mask_XT"].sum())
        batch["num_seqs"] = np.float32((batch["mask_XT"].sum(1) > 0).sum())
    if ref_params is not None:
        batch["ref_logprobs_XT"] = np.asarray(_ref_logprobs(model, ref_params, batch["tokens_XS"],
                                                            batch["prompt_len_X"], batch["mask_XT"].shape[1],
                                                            cfg.temperature))
    t1 = time.perf_counter()
    for _ in range(cfg.updates_per_rollout):
        state, metrics = train_step(state, batch)
    metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    rewards = np.concatenate(all_rewards).sum(-1)  # over every round's rollouts; LEAD: the streams' sum
    lengths = np.asarray(gen.lengths_BR)
    finite = rewards[np.isfinite(rewards)]
    out = {k: float(v) for k, v in {**metrics, **jax.device_get(adv_metrics)}.items() if np.ndim(v) == 0}
    out |= {"reward_mean": float(finite.mean()) if finite.size else float("nan"),
            "reward_std": float(finite.std()) if finite.size else float("nan"),
            "frac_reward_zero_std": float(np.mean(~informative(np.concatenate(all_rewards)))),
            "completion_len_mean": float(lengths.mean()), "completion_len_min": float(lengths.min()),
            "completion_len_max": float(lengths.max()),
            "truncated_ratio": float(np.mean(~np.asarray(gen.finished_BR))),
            "rollout_s": t1 - t0, "update_s": t2 - t1, "tokens_per_s": float(lengths.sum()) / max(t2 - t0, 1e-9)}
    if cfg.tree is not None:  # the prefix sharing: positions the tree decoded vs G independent samples
        out |= {k: float(gen.stats[k]) for k in ("decoded_rows_tokens", "independent_rows_tokens", "invalid_leaves")}
    if cfg.dynamic_rounds > 1:
        out |= {"dynamic_rounds": float(rounds), "dynamic_filled_groups": float(filled),
                "dynamic_bound_hit": float(filled < B)}
    return (state, out, adv_state) if stateful else (state, out)
