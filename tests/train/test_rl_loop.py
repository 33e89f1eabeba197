"""The RL step: trainer log-probs equal the sampler's, the loss mask holds the stop token, a short run on a toy
reward raises it (and the same run with the loss's sign flipped lowers it), bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmx.decoding import Sampler, generate
from lmx.models import build, preset
from lmx.train import rl
from lmx.train.optim import OptimConfig, make_optimizer
from lmx.train.rl_loop import RLConfig, completion_batch, completion_logprobs, make_policy_loss, rl_step
from lmx.train.sft import make_train_step
from lmx.train.state import TrainState

PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5], [42], [7, 7]]


def test_trainer_logprobs_equal_the_samplers_and_the_mask_holds_the_stop_token(tiny):
    model, params = tiny("llama-tiny")
    stops = tuple(range(0, 128, 9))  # several stop ids, all honoured
    gen = generate(model, params, PROMPTS, max_new_tokens=8, sampler=Sampler(0.7, top_k=5), rng=jax.random.key(0),
                   num_samples=3, stop_tokens=stops)
    batch = completion_batch(PROMPTS, gen, np.zeros((4, 3)))
    logp = completion_logprobs(model, params, jnp.asarray(batch["tokens_XS"]), jnp.asarray(batch["prompt_len_X"]),
                               8, temperature=0.7)
    mask = batch["mask_XT"] > 0
    np.testing.assert_allclose(np.where(mask, logp, 0), batch["old_logprobs_XT"], atol=1e-5)  # first ratio is 1
    lengths = np.asarray(gen.lengths_BR).reshape(-1)
    assert (mask.sum(1) == lengths).all()  # every completion token is trained on, the stop token included
    finished = np.asarray(gen.finished_BR).reshape(-1)
    assert finished.any()
    for x in np.flatnonzero(finished):
        assert batch["tokens_XS"][x, batch["prompt_len_X"][x] + lengths[x] - 1] in stops and mask[x, lengths[x] - 1]


def _run(flip_sign: bool, steps: int = 8):
    """A few RL steps on a toy reward: 1 when a sample's first token is below 64 (about half the vocabulary)."""
    model = build(preset("llama-tiny"))
    cfg = RLConfig(group_size=8, max_new_tokens=3, temperature=1.0, loss="grpo")
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=100, weight_decay=0.0))
    policy_loss = make_policy_loss(cfg)
    loss_fn = (lambda *a: jax.tree.map(lambda v: -v, policy_loss(*a))) if flip_sign else policy_loss
    train_step = make_train_step(model, optimizer, loss_fn=loss_fn)
    state = TrainState.create(model, optimizer, jax.random.PRNGKey(0))
    reward_fn = lambda gen: (np.asarray(gen.tokens_BRT[:, :, 0]) < 64).astype(np.float32)  # noqa: E731
    rewards = []
    for _ in range(steps):
        state, metrics = rl_step(state, PROMPTS, reward_fn, model=model, train_step=train_step, cfg=cfg)
        rewards.append(metrics["reward_mean"])
    return rewards, metrics


def test_a_short_run_raises_the_reward_and_a_flipped_sign_lowers_it():
    up, metrics = _run(flip_sign=False)
    down, _ = _run(flip_sign=True)
    assert up[0] == down[0]  # the same first rollout (same seed, no update yet)
    assert np.mean(up[-3:]) > up[0] + 0.2, up
    assert np.mean(down[-3:]) < down[0] - 0.2, down
    for key in ("loss", "grad_norm", "clip_frac_low", "clip_frac_high", "reward_std", "frac_reward_zero_std",
                "completion_len_mean", "truncated_ratio", "logprob_diff_max", "rollout_s", "update_s"):
        assert np.isfinite(metrics[key]), key
    assert metrics["logprob_diff_max"] < 1e-4  # μ = 1: the update's ratio starts at exactly 1


def test_bad_input_names_the_value(tiny):
    with pytest.raises(ValueError, match=r"RLConfig.group_size=0 must be an int >= 1"):
        RLConfig(group_size=0)
    with pytest.raises(ValueError, match=r"RLConfig.temperature=0.0 must be > 0"):
        RLConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"unknown .*'ppo2'.*grpo"):
        RLConfig(loss="ppo2")
    model, params = tiny("llama-tiny")
    cfg = RLConfig(group_size=2, max_new_tokens=2)
    state = TrainState(params, None, jnp.int32(0), jax.random.key_data(jax.random.key(0)))
    with pytest.raises(ValueError, match=r"reward_fn returned shape \(8,\), expected \[B, R\] = \(4, 2\)"):
        rl_step(state, PROMPTS, lambda gen: np.zeros(8), model=model, train_step=None, cfg=cfg)
    assert dataclasses.is_dataclass(cfg) and "grpo" in rl.available_losses()


def _dynamic(tiny, rounds: int, informative_per_round):
    """rl_step with dynamic sampling where round k's prompts have informative groups exactly at the given indices
    (reward = the sample index r there, constant 1 elsewhere); returns (metrics, the update batch)."""
    model, params = tiny("llama-tiny")
    cfg = RLConfig(group_size=2, max_new_tokens=2, dynamic_rounds=rounds)
    seen = {}

    def reward_for(k):
        def reward_fn(gen):
            r = np.ones(gen.lengths_BR.shape, np.float32)
            r[informative_per_round[k]] = [0.0, 1.0]
            return r
        return reward_fn

    def train_step(state, batch):
        seen["batch"] = batch
        return state, {"loss": jnp.float32(0)}

    refill = lambda k: ([[10 + k, i + 1] for i in range(4)], reward_for(k))  # noqa: E731
    state = TrainState(params, None, jnp.int32(0), jax.random.key_data(jax.random.key(0)))
    _, metrics = rl_step(state, PROMPTS, reward_for(0), model=model, train_step=train_step, cfg=cfg, refill=refill)
    return metrics, seen["batch"]


def test_dynamic_sampling_refills_the_dropped_groups(tiny):
    metrics, batch = _dynamic(tiny, rounds=4, informative_per_round=[[1], [0, 3], [2], [0, 1, 2, 3]])
    assert (metrics["dynamic_rounds"], metrics["dynamic_filled_groups"], metrics["dynamic_bound_hit"]) == (3, 4, 0)
    # Slot order: round 0's group 1, round 1's groups 0 and 3, round 2's group 2 (round 3 never ran).
    first_tokens = batch["tokens_XS"][::2, 0].tolist()
    assert first_tokens == [PROMPTS[1][0], 11, 11, 12]
    assert (batch["mask_XT"].sum(1) > 0).all()
    np.testing.assert_allclose(np.abs(batch["advantages_X"]), np.abs(batch["advantages_X"][0]))  # ±a in each group


def test_dynamic_sampling_stops_at_its_bound_and_still_trains(tiny):
    metrics, batch = _dynamic(tiny, rounds=2, informative_per_round=[[], [2], [0, 1, 2, 3]])
    assert (metrics["dynamic_rounds"], metrics["dynamic_filled_groups"], metrics["dynamic_bound_hit"]) == (2, 1, 1)
    assert batch["mask_XT"].shape[0] == 8  # static shape: B·R rows whatever was kept
    assert (batch["mask_XT"][2:].sum() == 0) and (batch["advantages_X"][2:] == 0).all()  # empty slots masked
    assert batch["mask_XT"][:2].sum() > 0
    metrics, batch = _dynamic(tiny, rounds=2, informative_per_round=[[], [], []])  # nothing informative at all
    assert metrics["dynamic_filled_groups"] == 0 and batch["mask_XT"].sum() == 0
    # ... and the real policy loss on that all-masked batch is 0 with a zero, finite gradient.
    model, params = tiny("llama-tiny")
    loss_fn = make_policy_loss(RLConfig(group_size=2, max_new_tokens=2))
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, None)[0])(params)
    assert float(loss) == 0 and all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_kl_to_a_reference_policy(tiny):
    model, params = tiny("llama-tiny")
    cfg = RLConfig(group_size=2, max_new_tokens=3, loss_config=rl.loss_config("grpo", beta=0.1))
    state = TrainState(params, None, jnp.int32(0), jax.random.key_data(jax.random.key(0)))
    reward_fn = lambda gen: np.asarray(gen.tokens_BRT[:, :, 0] < 64, np.float32)  # noqa: E731
    with pytest.raises(ValueError, match=r"β=0.1 > 0: pass ref_params"):
        rl_step(state, PROMPTS, reward_fn, model=model, train_step=None, cfg=cfg)
    policy_loss = make_policy_loss(cfg)
    seen = {}

    def train_step(state, batch):
        seen["metrics"] = policy_loss(model, state.params, batch, None)[1]
        return state, seen["metrics"]

    _, metrics = rl_step(state, PROMPTS, reward_fn, model=model, train_step=train_step, cfg=cfg, ref_params=params)
    assert abs(metrics["kl"]) < 1e-6  # the policy is its own reference
    far = jax.tree.map(lambda a: a * 1.5, params)
    _, metrics = rl_step(state, PROMPTS, reward_fn, model=model, train_step=train_step, cfg=cfg, ref_params=far)
    assert metrics["kl"] > 1e-3


@pytest.mark.parametrize("loss", ["dapo", "gspo"])  # token-mean; seq-mean-token-mean with GSPO's sequence ratio
def test_micro_batches_through_the_trainer_give_the_whole_batch_update(tiny, loss):
    model, params = tiny("llama-tiny")
    optimizer = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify rounding in tiny entries)
    reward_fn = lambda gen: np.asarray(gen.lengths_BR, np.float32) + np.arange(3)  # noqa: E731
    seen = {}

    def updated(micro: int, drop_normalisers: bool = False):
        cfg = RLConfig(group_size=3, max_new_tokens=5, loss=loss, micro_batches=micro, stop_tokens=(3, 8))
        inner = make_train_step(model, optimizer, loss_fn=make_policy_loss(cfg), micro_batches=micro)

        def train_step(state, batch):
            seen[micro] = batch
            if drop_normalisers:
                batch = {k: v for k, v in batch.items() if k not in ("num_tokens", "num_seqs")}
            return inner(state, batch)

        state = TrainState(jax.tree.map(jnp.copy, params), optimizer.init(params), jnp.int32(0),
                           jax.random.key_data(jax.random.key(0)))
        state, metrics = rl_step(state, PROMPTS, reward_fn, model=model, train_step=train_step, cfg=cfg)
        return state.params, metrics

    whole, m1 = updated(1)
    split, m2 = updated(2)
    assert (seen[1]["mask_XT"].sum(1) < 5).any()  # rows of unequal length: the normalisers matter
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if loss == "dapo":  # negative control: each slice normalised by its own token count is a different loss
        naive, m3 = updated(2, drop_normalisers=True)
        assert abs(m3["loss"] - m1["loss"]) > 1e-4 * abs(m1["loss"]) + 1e-6
    with pytest.raises(ValueError, match=r"micro_batches=5 does not divide the 12 rows"):
        rl_step(TrainState(params, None, jnp.int32(0), jax.random.key_data(jax.random.key(0))), PROMPTS, reward_fn,
                model=model, train_step=None, cfg=RLConfig(group_size=3, max_new_tokens=2, micro_batches=5))


def test_lead_advantage_in_the_step_carries_its_ema(tiny):
    model, params = tiny("llama-tiny")
    cfg = RLConfig(group_size=4, max_new_tokens=4, advantage="lead")
    state = TrainState(params, None, jnp.int32(0), jax.random.key_data(jax.random.key(0)))
    correct = lambda gen: np.asarray(gen.tokens_BRT[:, :, 0] < 64, np.float32)  # noqa: E731
    efficiency = lambda gen: 1.0 - np.asarray(gen.lengths_BR, np.float32) / 4  # noqa: E731
    seen = {}

    def train_step(state, batch):
        seen["adv"] = batch["advantages_X"]
        return state, {"loss": jnp.float32(0)}

    with pytest.raises(ValueError, match="pass adv_state"):
        rl_step(state, PROMPTS, correct, model=model, train_step=train_step, cfg=cfg)
    with pytest.raises(ValueError, match=r"takes 2 reward stream\(s\).*returned 1"):
        rl_step(state, PROMPTS, correct, model=model, train_step=train_step, cfg=cfg, adv_state=rl.lead_init_state())
    both = lambda gen: (correct(gen), efficiency(gen))  # noqa: E731
    _, metrics, ema = rl_step(state, PROMPTS, both, model=model, train_step=train_step, cfg=cfg,
                              adv_state=rl.lead_init_state())
    gen = generate(model, params, PROMPTS, max_new_tokens=4, sampler=Sampler(1.0), num_samples=4,
                   rng=jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.rng, 1 << 20), 0), 0))
    want, want_ema, _ = rl.lead_advantages(correct(gen), efficiency(gen), 4, state=rl.lead_init_state())
    np.testing.assert_allclose(seen["adv"], np.asarray(want).reshape(-1), atol=1e-6)  # the step's own rollouts
    assert float(ema["w_c"]) == float(want_ema["w_c"]) != 0.5 and "lead_w_c" in metrics


def test_treepo_step_trains_on_the_tree_with_its_subgroup_advantages(tiny):
    from lmx.train.treepo import TreeConfig, tree_rollout

    model, params = tiny("llama-tiny")
    tree = TreeConfig(segment_len=2, branching=(1, 2, 2), max_new_tokens=6)
    stops = tuple(range(0, 128, 5))  # some branches finish early: reallocation, maybe duplicates
    cfg = RLConfig(group_size=4, max_new_tokens=6, advantage="treepo", tree=tree, stop_tokens=stops)
    state = TrainState(params, None, jnp.int32(0), jax.random.key_data(jax.random.key(3)))
    reward_fn = lambda gen: np.asarray(gen.tokens_BRT[:, :, -1] % 3, np.float32)  # noqa: E731
    seen = {}

    def train_step(state, batch):
        seen["batch"] = batch
        return state, {"loss": jnp.float32(0)}

    _, metrics = rl_step(state, PROMPTS, reward_fn, model=model, train_step=train_step, cfg=cfg)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.rng, 1 << 20), 0), 0)
    gen, ids, valid = tree_rollout(model, params, PROMPTS, cfg=tree, sampler=Sampler(1.0), rng=rng, stop_tokens=stops)
    want, _ = rl.treepo_advantages(reward_fn(gen), 4, subgroup_ids=ids, valid=valid)
    batch = seen["batch"]
    np.testing.assert_allclose(batch["advantages_X"], np.asarray(want).reshape(-1), atol=1e-6)
    lengths = np.where(np.asarray(valid), np.asarray(gen.lengths_BR), 0).reshape(-1)
    np.testing.assert_array_equal(batch["mask_XT"].sum(1), lengths)  # duplicate leaves carry no loss
    assert metrics["decoded_rows_tokens"] < metrics["independent_rows_tokens"]  # the shared prefixes
    with pytest.raises(ValueError, match=r"advantage='treepo' needs the tree"):
        RLConfig(advantage="treepo")
    with pytest.raises(ValueError, match=r"G=4 leaves .* group_size=8"):
        RLConfig(group_size=8, max_new_tokens=6, tree=tree)
