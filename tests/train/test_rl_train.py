"""The RL run loop: a run killed at step k and resumed equals the uninterrupted run bit for bit (metrics and
TrainState), metrics.jsonl holds the per-step keys, a NaN loss stops the run keeping the last good checkpoint."""

import jax
import numpy as np
import pytest

from experiments.configs.rl import get_config
from lmx.train.checkpoint import Checkpointer
from lmx.train.metrics import read_metrics
from lmx.train.rl_train import comparable, parse_reward_spec, train_rl

STEPS = 6


def tiny_rl_config(steps: int = STEPS):
    cfg = get_config()
    cfg.init_from = "random"  # no SFT: the loop, not the policy's quality, is under test
    cfg.model.update({"d_model": 32, "num_layers": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 16, "max_seq_len": 64})
    # The length reward gives a random policy's groups distinct rewards (it stops at random lengths), so the
    # updates are not all zero.
    cfg.reward = "correctness+kimi_length"
    cfg.rl.update({"batch_size": 4, "group_size": 4, "max_new_tokens": 12})
    cfg.train.update({"steps": steps, "ckpt_every": 3, "keep_checkpoints": 3})
    cfg.optim.lr = 1e-2
    cfg.eval.update({"num_problems": 8, "batch_size": 8, "max_new_tokens": 12})
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rl_full")
    return run_dir, train_rl(tiny_rl_config(), run_dir, progress=False)


def test_killed_and_resumed_equals_the_uninterrupted_run(full_run, tmp_path):
    _, full = full_run
    cfg = tiny_rl_config()
    train_rl(cfg, tmp_path, stop_at=4, progress=False)  # killed after step 4; the last checkpoint is step 3
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3]
    resumed = train_rl(cfg, tmp_path, progress=False)
    a, b = read_metrics(tmp_path), full.history
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(STEPS + 1))  # step 4 appears once
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    assert any(r.get("grad_norm", 0) > 0 for r in b)  # the updates did something
    leaves_a = jax.tree_util.tree_leaves_with_path(resumed.state)
    leaves_b = jax.tree_util.tree_leaves_with_path(full.state)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert int(full.state.step) == STEPS
    assert resumed.eval["accuracy"] == full.eval["accuracy"]


def test_metrics_have_the_per_step_keys(full_run):
    run_dir, full = full_run
    records = read_metrics(run_dir)
    assert {"eval/accuracy", "eval/gen_tokens"} <= set(records[0]) and "loss" not in records[0]
    keys = ("reward_mean", "reward_std", "frac_reward_zero_std", "accuracy", "reward/correctness_mean",
            "reward/kimi_length_mean", "loss", "grad_norm", "param_norm", "lr", "clip_frac_low", "clip_frac_high",
            "logprob_diff_max", "advantage_mean", "advantage_std", "completion_len_mean", "completion_len_min",
            "completion_len_max", "truncated_ratio", "rollout_s", "update_s", "tokens_per_s")
    for r in records[1:]:
        missing = [k for k in keys if k not in r]
        assert not missing, (r["step"], missing)
        assert all(np.isfinite(r[k]) for k in keys), r
        assert r["logprob_diff_max"] < 1e-4  # μ = 1: the sampler's log-probs are the trainer's
    assert "eval/accuracy" in records[-1]
    assert (run_dir / "tb").is_dir() and (run_dir / "config.json").exists()
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [3, 6]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_rl_config(steps=4)
    cfg.eval.num_problems = 0

    def poison(step, batch):
        if step == 4:
            batch = {**batch, "advantages_X": np.full_like(batch["advantages_X"], np.nan)}
        return batch

    with pytest.raises(FloatingPointError, match=r"non-finite RL step 4: loss=nan.*last good checkpoint: step 3"):
        train_rl(cfg, tmp_path, batch_hook=poison, progress=False)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_bad_reward_spec_names_the_value():
    assert [t.name for t in parse_reward_spec("correctness+0.5*kimi_length")] == ["correctness", "kimi_length"]
    assert parse_reward_spec("correctness+0.5*kimi_length")[1].weight == 0.5
    with pytest.raises(ValueError, match=r"unknown reward 'lenght'.*kimi_length"):
        parse_reward_spec("correctness+lenght")
    with pytest.raises(ValueError, match=r"empty term"):
        parse_reward_spec("correctness+")


def test_sft_first_and_init_from_that_sft_run_start_from_the_same_params(tmp_path):
    cfg = tiny_rl_config(steps=2)
    cfg.init_from = ""  # train a short SFT first, under run_dir/sft
    cfg.sft.train.update({"steps": 4, "batch_size": 8, "ckpt_every": 4, "log_every": 1})
    cfg.eval.num_problems = 0
    first = train_rl(cfg, tmp_path / "a", progress=False)
    assert Checkpointer(tmp_path / "a" / "sft" / "checkpoints").all_steps() == [4]
    cfg.init_from = str(tmp_path / "a" / "sft")
    second = train_rl(cfg, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "sft").exists()
    assert [comparable(r) for r in first.history] == [comparable(r) for r in second.history]
    with pytest.raises(FileNotFoundError, match=r"not an SFT run directory"):
        cfg.init_from = str(tmp_path / "nowhere")
        train_rl(cfg, tmp_path / "c", progress=False)


def test_lead_with_a_reference_policy_and_micro_batches_resumes_exactly(tmp_path):
    """LEAD's EMA and π_ref are part of the run's state: killed and resumed = uninterrupted, bit for bit."""
    cfg = tiny_rl_config(steps=4)
    # A random policy is never correct, which would leave LEAD's weight at 0.5 (D_c + D_e = 0). So the
    # correctness stream here is the length reward, "correct" when ≥ 0: both streams vary and the EMA moves.
    cfg.reward = "kimi_length+lead"
    cfg.advantage_kwargs = {"correct_threshold": 0.0}
    cfg.loss_kwargs = {"beta": 0.05}
    cfg.rl.micro_batches = 2
    cfg.train.ckpt_every = 2
    cfg.eval.num_problems = 0
    full = train_rl(cfg, tmp_path / "full", progress=False)
    assert Checkpointer(tmp_path / "full" / "reference").all_steps() == [0]
    train_rl(cfg, tmp_path / "resumed", stop_at=3, progress=False)  # killed after step 3; resumes from step 2
    resumed = train_rl(cfg, tmp_path / "resumed", progress=False)
    a, b = read_metrics(tmp_path / "resumed"), full.history
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    w = [r["lead_w_c"] for r in b]
    assert len(set(w)) == len(w)  # the EMA moves every step, so a restart from 0.5 would show
    assert all(r["kl"] > 0 for r in b[1:]) and all("reward/lead_mean" in r for r in b)
    for x, y in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match=r"config.advantage='group_centered'"):
        cfg.advantage = "group_centered"
        train_rl(cfg, tmp_path / "bad", progress=False)


def test_a_lead_only_spec_pairs_the_verifier_with_the_efficiency_stream():
    from types import SimpleNamespace

    from lmx.data import CharTokenizer
    from lmx.data.tasks import Arithmetic
    from lmx.train import rewards as rw
    from lmx.train.rl_train import make_reward_fn

    tok, task = CharTokenizer(), Arithmetic()
    problem = task.make(12, 30, "+")
    rows = [tok.encode("<think>2+0+0=02;1+3+0=04</think><answer>42</answer>") + [tok.eos_id],
            tok.encode("<answer>41</answer>") + [tok.eos_id]]
    T = max(map(len, rows)) + 2
    tokens = np.zeros((1, 2, T), np.int32)
    for r, row in enumerate(rows):
        tokens[0, r, :len(row)] = row
    gen = SimpleNamespace(tokens_BRT=tokens, lengths_BR=np.array([[len(r) for r in rows]], np.int32))
    log = []
    correctness, efficiency = make_reward_fn(task, tok, [problem], parse_reward_spec("lead"), log)(gen)
    np.testing.assert_array_equal(correctness, [[1.0, 0.0]])
    inputs = rw.make_reward_inputs(np.array([[1.0, 0.0]]), tokens, gen.lengths_BR)
    np.testing.assert_allclose(efficiency, rw.lead_reward(inputs, rw.LeadConfig()))
    assert set(log[0][1]) == {"correctness", "lead"}


def test_config_turns_on_tree_rollouts_and_micro_batches():
    from lmx.train.rl_train import rl_config

    cfg = tiny_rl_config()
    assert rl_config(cfg, 2).tree is None and rl_config(cfg, 2).micro_batches == 1
    cfg.advantage = "treepo"
    cfg.rl.update({"group_size": 4, "micro_batches": 2, "tree": {"segment_len": 3, "branching": (1, 2, 2)}})
    got = rl_config(cfg, 2)
    assert (got.tree.segment_len, got.tree.branching, got.tree.max_new_tokens) == (3, (1, 2, 2), 12)
    assert got.micro_batches == 2 and got.advantage == "treepo"


def test_l1_budgets_in_the_prompt_and_o1_pruner_reference_stats(tmp_path):
    """L1: each prompt carries its budget and the reward sees the same n_gold; O1-Pruner: L̄_ref, Ā_ref come from
    π_ref's own samples of the step's prompts (a frozen start policy, checkpointed, so resume stays exact)."""
    from lmx.train import rewards as rw
    from lmx.train.rl_train import _budget_fn

    add = _budget_fn({"min": 5, "max": 9, "template": "[{n}]{prompt}"})
    problems = get_task_problems()
    got, n_B = add(problems, np.random.default_rng(0))
    assert [p.prompt for p in got] == [f"[{int(n)}]{p.prompt}" for p, n in zip(problems, n_B, strict=True)]
    assert ((5 <= n_B) & (n_B <= 9)).all() and [p.answer for p in got] == [p.answer for p in problems]
    with pytest.raises(ValueError, match=r"min=0, max=3"):
        _budget_fn({"min": 0, "max": 3})

    seen = []
    real = rw.make_reward_inputs

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    cfg = tiny_rl_config(steps=1)
    cfg.reward = "l1_max+o1_pruner"
    cfg.reward_kwargs = {"o1_pruner": {"normalize": "none"}}
    cfg.budget = {"min": 4, "max": 8, "template": "[{n}]{prompt}"}
    cfg.eval.num_problems = 0
    rw.make_reward_inputs = spy
    try:
        run = train_rl(cfg, tmp_path, progress=False)
    finally:
        rw.make_reward_inputs = real
    assert Checkpointer(tmp_path / "reference").all_steps() == [0]
    kw = seen[0]
    assert kw["budgets_B"].shape == (4,) and ((4 <= kw["budgets_B"]) & (kw["budgets_B"] <= 8)).all()
    assert kw["ref_lengths_B"].shape == (4,) and (kw["ref_lengths_B"] >= 1).all()
    assert all("reward/l1_max_mean" in r and "reward/o1_pruner_mean" in r for r in run.history)
    with pytest.raises(ValueError, match=r"reward_kwargs names \['kimi_length'\]"):
        parse_reward_spec("correctness", {"kimi_length": {"length": "think"}})


def get_task_problems():
    from lmx.data.tasks import Arithmetic

    return Arithmetic().sample(np.random.default_rng(1), 6)


# An early-exit model samples through the base LM's decode path (its exits matter only to early-exit decoding and
# the exit losses), so the two variants with decode paths of their own run here.
@pytest.mark.parametrize("variant", [
    {"parscale": {"P": 2, "n_prefix": 3}},
    {"recursion": {"num_unique": 1, "lora_rank": 2}},
], ids=["parscale", "recursive"])
def test_variants_train_with_rl(variant, tmp_path):
    """Each model variant runs the RL loop: rollouts decode through the variant's cached path and the update scores
    them teacher-forced, so the sampler's log-probs equal the trainer's (logprob_diff_max, μ = 1) only if the
    variant's cached decode equals its teacher-forced forward; the update moves the params."""
    cfg = tiny_rl_config(steps=2)
    cfg.model.update({"num_layers": 2, **variant})
    cfg.eval.num_problems = 0
    run = train_rl(cfg, tmp_path, progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["logprob_diff_max"] < 1e-4 and np.isfinite(r["loss"]) for r in records), records
    assert any(r["grad_norm"] > 0 for r in records)
    assert int(run.state.step) == 2
    if "parscale" in variant:
        assert "parscale" in run.params
