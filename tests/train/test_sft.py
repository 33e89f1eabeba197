import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.data import CharTokenizer, encode_example, get_task, make_batch, pack_examples
from lmx.models import build, preset
from lmx.train import (
    OptimConfig,
    TrainState,
    decay_mask,
    distill_loss,
    evaluate,
    lr_schedule,
    make_optimizer,
    make_train_step,
    masked_cross_entropy,
)
from lmx.train.sft import _count_between, sft_loss

TOK = CharTokenizer()


def test_masked_cross_entropy_hand_value():
    logits_BTV = jnp.array([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    tokens_BT = jnp.array([[2, 0, 1]])
    mask_BT = jnp.array([[0.0, 1.0, 1.0]])  # tokens 1 and 2 are targets: predicted from positions 0 and 1
    loss, metrics = masked_cross_entropy(logits_BTV, tokens_BT, mask_BT)
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))
    nll0 = lse(0, 1, 2) - 0.0  # position 0 predicts token 0
    nll1 = lse(3, 0, 0) - 0.0  # position 1 predicts token 1 (logit 0)
    np.testing.assert_allclose(loss, (nll0 + nll1) / 2, rtol=1e-6)
    assert metrics["tokens"] == 2
    np.testing.assert_allclose(metrics["token_accuracy"], 0.0)  # argmaxes are 2 and 0; targets 0 and 1

    loss_one, _ = masked_cross_entropy(logits_BTV, tokens_BT, jnp.array([[0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(loss_one, nll1, rtol=1e-6)
    loss_none, m = masked_cross_entropy(logits_BTV, tokens_BT, jnp.zeros((1, 3)))
    assert loss_none == 0 and m["tokens"] == 0


def test_distill_loss():
    rng = np.random.default_rng(0)
    s_BTV, t_BTV = (jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32) for _ in range(2))
    mask_BT = jnp.array([[0, 1, 1, 1], [0, 0, 1, 0]], jnp.float32)
    same, _ = distill_loss(s_BTV, s_BTV, mask_BT)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    tau = 2.0
    p = jax.nn.softmax(t_BTV[:, :-1] / tau)
    kl = (p * (jnp.log(p) - jax.nn.log_softmax(s_BTV[:, :-1] / tau))).sum(-1)
    want = (kl * mask_BT[:, 1:]).sum() / mask_BT[:, 1:].sum() * tau**2
    got, metrics = distill_loss(s_BTV, t_BTV, mask_BT, temperature=tau)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got > 0 and metrics["tokens"] == 4


def test_lr_schedule_and_decay_mask():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lr = lr_schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(3), lr(4), lr(9), lr(14), lr(100)], [0.25, 1.0, 1.0, 0.55, 0.1, 0.1],
                               rtol=1e-6)
    params = {"embed": {"embedding": 0}, "layers": {"attn": {"q": 0, "q_bias": 0}, "attn_norm": {"scale": 0}},
              "lm_head": 0}
    assert decay_mask(params) == {"embed": {"embedding": False},
                                  "layers": {"attn": {"q": True, "q_bias": False}, "attn_norm": {"scale": False}},
                                  "lm_head": True}
    with pytest.raises(ValueError, match="total_steps"):
        OptimConfig(total_steps=0)


@pytest.fixture(scope="module")
def setup():
    """Model, optimizer and jitted step shared by the tests below (one compilation per batch shape);
    `fresh()` gives a new initial state (the step donates its input)."""
    model = build(preset("llama-tiny", vocab_size=TOK.vocab_size, d_model=32, mlp_dim=64))
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10)
    optimizer = make_optimizer(opt_cfg)
    fresh = lambda: TrainState.create(model, optimizer, jax.random.PRNGKey(0))
    return model, fresh, make_train_step(model, optimizer, lr_fn=lr_schedule(opt_cfg))


def _examples(n=8, seed=0):
    problems = get_task("arithmetic", num_digits=(1, 2)).sample(np.random.default_rng(seed), n)
    return [encode_example(TOK, p) for p in problems]


def test_train_step_reduces_loss_and_donates(setup):
    model, fresh, train_step = setup
    state = fresh()
    batch = make_batch(_examples(), 48)
    old_params = state.params
    losses = []
    for _ in range(8):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses
    assert int(state.step) == 8
    assert set(metrics) >= {"loss", "grad_norm", "lr", "tokens", "token_accuracy"}
    assert float(metrics["tokens"]) == batch["loss_mask_BT"][:, 1:].sum()
    # The input state was donated: its buffers are gone, and the returned state keeps working.
    assert all(x.is_deleted() for x in jax.tree.leaves(old_params))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(jax.tree.leaves(old_params)[0])
    state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 9


def test_packed_batch_matches_padded(setup):
    """Segment ids and restarting positions make a packed row compute what separate rows compute."""
    model, fresh, _ = setup
    params = fresh().params
    examples = _examples(6, seed=1)
    padded, packed = make_batch(examples, 96), pack_examples(examples, 96)
    assert len(packed["tokens_BT"]) < len(examples)
    loss_fn = jax.jit(lambda b: sft_loss(model, params, b, None))
    loss_padded, m_padded = loss_fn(padded)
    loss_packed, m_packed = loss_fn(packed)
    assert m_padded["tokens"] == m_packed["tokens"]
    np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-5)
    # Treating the packed row as one sequence (attending across examples) gives a different loss.
    T = packed["tokens_BT"].shape[1]
    leaky = {**packed, "segment_ids_BT": np.ones_like(packed["segment_ids_BT"]),
             "positions_BT": np.broadcast_to(np.arange(T, dtype=np.int32), packed["positions_BT"].shape)}
    assert abs(float(loss_fn(leaky)[0]) - float(loss_padded)) > 1e-3


def test_count_between():
    assert _count_between([9, 3, 7, 7, 7, 4, 5], 3, 4) == 3
    assert _count_between([3, 7, 7], 3, 4) == 2  # unclosed: to the end
    assert _count_between([7, 7], 3, 4) == 0


def test_evaluate_scores_generations(setup):
    model, fresh, _ = setup
    state = fresh()
    task = get_task("arithmetic", num_digits=(1, 1))
    problems = task.sample(np.random.default_rng(0), 3)
    out = evaluate(model, state.params, task, TOK, problems, max_new_tokens=6, batch_size=2)
    assert len(out["samples"]) == 3
    assert 0.0 <= out["accuracy"] <= 1.0
    for s, p in zip(out["samples"], problems, strict=True):
        assert s["prompt"] == p.prompt and s["answer"] == p.answer
        assert 1 <= s["gen_tokens"] <= 6 and s["score"] == task.score(p, s["completion"])
    assert out["gen_tokens"] == np.mean([s["gen_tokens"] for s in out["samples"]])


def test_evaluate_scores_known_completions(monkeypatch):
    """`evaluate` on generations whose right and wrong answers are known: a stub stands in for
    `lmx.decoding.generate` and emits chosen token rows, so the exact scores, accuracy and token counts
    are fixed in advance (an untrained model scores 0 whatever evaluate does)."""
    import lmx.decoding
    import lmx.train.sft
    from lmx.decoding import Generation, Greedy

    task = get_task("arithmetic", num_digits=(1, 1))
    max_new = 24
    unfinished = f"<answer>18</answer><think>{'x' * (max_new - 5)}"  # 24 tokens, no eos: cut off at max_new
    cases = [  # (a, b, generated text, eos?, score, tokens between <think> and </think>)
        (3, 4, "<think>3+4=7</think><answer>7</answer>", True, 1.0, 5),  # right
        (2, 5, "<think>2+5=8</think><answer>8</answer>", True, 0.0, 5),  # wrong
        (9, 9, unfinished, False, 1.0, max_new - 5),  # right, never stopped; the think is unclosed
        (1, 0, "<answer>1", True, 0.0, 0),  # right number but no </answer>
        (6, 2, "<answer> 8 </answer>", True, 1.0, 0),  # right (whitespace stripped)
    ]
    problems = [task.make(a, b, "+") for a, b, *_ in cases]
    rows = {(TOK.bos_id, *TOK.encode(p.prompt)): TOK.encode(text) + [TOK.eos_id] * eos
            for p, (_, _, text, eos, *_) in zip(problems, cases, strict=True)}
    assert all(len(r) <= max_new for r in rows.values()) and len(rows) == len(cases)
    model, params, calls = object(), object(), []

    def fake_generate(model_, params_, prompts, *, max_new_tokens, sampler, stop_tokens, **kwargs):
        assert model_ is model and params_ is params
        assert max_new_tokens == max_new and sampler == Greedy() and tuple(stop_tokens) == (TOK.eos_id,)
        calls.append(len(prompts))
        out = [rows[tuple(p)] for p in prompts]
        tokens = np.full((len(out), 1, max_new_tokens), TOK.pad_id, np.int32)
        for i, r in enumerate(out):
            tokens[i, 0, : len(r)] = r
        return Generation(tokens_BRT=jnp.asarray(tokens), lengths_BR=jnp.array([[len(r)] for r in out], jnp.int32),
                          logprobs_BRT=jnp.zeros(tokens.shape, jnp.float32),
                          finished_BR=jnp.array([[r[-1] == TOK.eos_id] for r in out]), stats={})

    monkeypatch.setattr(lmx.decoding, "generate", fake_generate)
    monkeypatch.setattr(lmx.train.sft, "generate", fake_generate, raising=False)  # if ever imported at top
    out = evaluate(model, params, task, TOK, problems, max_new_tokens=max_new, batch_size=2)
    assert calls == [2, 2, 2]  # 5 problems in fixed batches of 2, the last padded

    assert [s["score"] for s in out["samples"]] == [c[4] for c in cases]
    assert out["accuracy"] == 0.6
    assert [s["completion"] for s in out["samples"]] == [c[2] for c in cases]  # eos dropped from the text
    assert [(s["prompt"], s["answer"]) for s in out["samples"]] == [(p.prompt, p.answer) for p in problems]
    gen_tokens = [len(TOK.encode(c[2])) + c[3] for c in cases]  # the eos counts
    assert [s["gen_tokens"] for s in out["samples"]] == gen_tokens == [11, 11, 24, 3, 6]
    assert [s["cot_tokens"] for s in out["samples"]] == [c[5] for c in cases]
    assert out["gen_tokens"] == np.mean(gen_tokens) and out["cot_tokens"] == np.mean([c[5] for c in cases])


def test_mamba3_packed_matches_padded_and_trains():
    """SFT on Mamba-3 SSM layers: packed segments reset the state (packed loss == padded loss), and train steps
    lower the loss."""
    cfg = preset("mamba3-tiny", vocab_size=TOK.vocab_size)
    # Chunks of 32 (the preset's 4 makes 24 chunks of these 96 positions, which only lengthens compilation; several
    # chunks per sequence, and resets inside chunks, are still exercised).
    model = build(cfg.replace(ssm=dataclasses.replace(cfg.ssm, chunk_size=32)))
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10)
    optimizer = make_optimizer(opt_cfg)
    state = TrainState.create(model, optimizer, jax.random.PRNGKey(0))
    examples = _examples(6, seed=1)
    padded, packed = make_batch(examples, 96), pack_examples(examples, 96)
    loss_fn = jax.jit(lambda p, b: sft_loss(model, p, b, None)[0])
    np.testing.assert_allclose(loss_fn(state.params, packed), loss_fn(state.params, padded), rtol=1e-5)
    train_step = make_train_step(model, optimizer, lr_fn=lr_schedule(opt_cfg))
    losses = []
    for _ in range(6):
        state, metrics = train_step(state, padded)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
