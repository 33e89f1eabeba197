"""Relaxed recursive transformer: equal to the looped base with zero LoRA, full-rank conversion equal to the base,
cached decode equal to teacher-forced, loop exits (teacher-forced, and early-exit decoding after a loop), trains,
fewer params, bad input.

To keep the file fast, every teacher-forced call runs on tokens [2, 9] and every relaxed model has N = 4, K = 2 and
rank R = 64 with loop exits on (lower ranks are zero-padded to R: the same function), so each program compiles
once; the lower ranks are the full-rank conversion truncated (a truncated SVD is the leading part of the full one).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmx.decoding.early_exit import early_exit_generate
from lmx.decoding.generate import generate
from lmx.decoding.sampling import Greedy
from lmx.models import build, decode_params, forward, init_state, preset
from lmx.models.lm import embed, head, make_ctx, run_layers
from lmx.models.recursive import RecursionConfig, RecursiveLM, from_base, param_count
from tests.tiny import tiny_model

N, K, R = 4, 2, 64  # R = d_model: full rank for every target matrix of qwen2-tiny
TOKENS_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 128)


@functools.cache
def _forward_fn(model):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def _logits(model, params, tokens_BT=TOKENS_BT):
    return _forward_fn(model)(params, tokens_BT).logits_BTV


def _base():  # distinct random layers, norm scales around 1, qkv biases, tied embeddings
    return tiny_model("qwen2-tiny", num_layers=N)


@functools.cache
def _full_rank():
    base_model, base_params = _base()
    cfg, params = from_base(base_model.cfg, base_params, RecursionConfig(K, R, loop_exits=True))
    return build(cfg), params


def _truncated(params, rank: int):
    """params with every relaxation cut to its leading `rank` components (zero-padded back to R; the bias offsets
    kept)."""
    keep_R = np.arange(R) < rank  # numpy here and below: eager jnp ops on new shapes each compile a program

    def cut(ab):
        return {"a": ab["a"] * keep_R, "b": ab["b"] * keep_R[:, None]} if isinstance(ab, dict) else ab

    lora = jax.tree.map(np.asarray, params["lora"])
    return dict(params, lora=jax.tree.map(cut, lora, is_leaf=lambda x: isinstance(x, dict) and "a" in x))


def test_zero_lora_with_tied_layers_equals_the_looped_base():
    base_model, base_params = _base()
    unique = jax.tree.map(lambda w: w[:K], base_params["layers"])
    looped = dict(base_params, layers=jax.tree.map(lambda w: np.concatenate([w, w]), unique))  # layer l = l mod K
    model, relaxed = _full_rank()
    params = dict(relaxed, layers=unique, lora=jax.tree.map(np.zeros_like, relaxed["lora"]))  # embed is the base's
    np.testing.assert_array_equal(_logits(model, params), _logits(base_model, looped))


def test_conversion_full_rank_equals_base_and_error_shrinks_with_rank():
    base_model, base_params = _base()
    model, params = _full_rank()
    want = np.asarray(_logits(base_model, base_params))
    np.testing.assert_allclose(_logits(model, params), want, atol=1e-4)
    # RMS logit error by rank (random layers have flat residual spectra, so low ranks help little).
    rms = [np.sqrt(np.mean((np.asarray(_logits(model, _truncated(params, r))) - want) ** 2)) for r in (0, 8, 32, R)]
    assert rms[0] > rms[1] > rms[2] > 1e4 * rms[3], rms
    # A rank-4 conversion is the full one truncated; W′ is the mean of the tied (norm-folded) layers, so the tied
    # relaxations sum to zero.
    cfg, low = from_base(base_model.cfg, base_params, RecursionConfig(K, 4))
    assert cfg.recursion == RecursionConfig(K, 4) and set(low) == set(params)
    ab, full = jax.tree.map(np.asarray, (low["lora"]["mlp"]["up"], params["lora"]["mlp"]["up"]))
    assert ab["a"].shape == (N, 64, 4) and ab["b"].shape == (N, 4, 192)
    np.testing.assert_allclose(ab["a"] @ ab["b"], full["a"][..., :4] @ full["b"][:, :4], atol=1e-5)
    np.testing.assert_allclose(low["layers"]["attn_norm"]["scale"], 1.0)
    merged = (full["a"] @ full["b"]).reshape(N // K, K, 64, 192)
    np.testing.assert_allclose(merged.sum(0), 0.0, atol=1e-5)


def test_cached_decode_equals_teacher_forced():
    model, full = _full_rank()
    params = _truncated(full, 16)  # a relaxation that differs per depth
    want_BTV = _logits(model, params)
    # Per-depth KV caches: a prefill of 6 through model.apply with a state, then single tokens through `forward`.
    assert len(init_state(model.cfg, 2, 9).layers) == N
    prefill = jax.jit(lambda p, t, s: model.apply({"params": p}, t, state=s))
    out = prefill(params, TOKENS_BT[:, :6], init_state(model.cfg, 2, 9))
    state, logits = out.state, [out.logits_BTV]
    split = decode_params(model, params)
    assert len(split.layers) == N and decode_params(model, params) is split  # merged once per params object
    step = jax.jit(lambda p, t, s: forward(model, p, t, s))
    for t in range(6, 9):
        out = step(split, TOKENS_BT[:, t:t + 1], state)
        state = out.state
        logits.append(out.logits_BTV)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), want_BTV, atol=1e-5)
    assert state.lengths_B.tolist() == [9, 9]
    # Greedy generate: every token is the teacher-forced argmax, with its log-prob.
    prompts = [[5, 7, 9, 11], [3, 1]]
    gen = generate(model, params, prompts, max_new_tokens=5, sampler=Greedy())
    seqs = np.zeros((2, 9), np.int32)
    for i, p in enumerate(prompts):
        seqs[i, :len(p) + 5] = p + gen.tokens_BRT[i, 0].tolist()
    logp_BTV = jax.nn.log_softmax(_logits(model, params, jnp.asarray(seqs)))
    for i, p in enumerate(prompts):
        at = np.arange(len(p) - 1, len(p) + 4)
        np.testing.assert_array_equal(gen.tokens_BRT[i, 0], np.argmax(logp_BTV[i, at], -1))
        np.testing.assert_allclose(gen.logprobs_BRT[i, 0], logp_BTV[i, at, seqs[i, at + 1]], atol=1e-4)


def test_loop_exits_are_the_head_after_each_loop():
    model, full = _full_rank()
    params = _truncated(full, 16)
    out = _forward_fn(model)(params, TOKENS_BT)
    assert out.aux["loop_logits_EBTV"].shape == (N // K, 2, 9, 128)
    np.testing.assert_array_equal(out.aux["loop_logits_EBTV"][-1], out.logits_BTV)

    @jax.jit
    def first_loop(split, tokens_BT):  # the layer-loop pieces: depths [0, K), then the head
        ctx = make_ctx(jnp.zeros(2, jnp.int32), tokens_BT.shape[1])
        x_BTD, _ = run_layers(model, split, embed(model, split, tokens_BT), None, ctx, 0, K)
        return head(model, split, x_BTD)[0]

    want = first_loop(decode_params(model, params), TOKENS_BT)
    np.testing.assert_allclose(out.aux["loop_logits_EBTV"][0], want, atol=1e-5)
    assert float(jnp.max(jnp.abs(want - out.logits_BTV))) > 0.1  # the first loop is not the whole model


def test_early_exit_decoding_stops_after_a_loop():
    """Early-exit decoding over the loops (EarlyExit with the model's decode_exits hook): a threshold that never
    fires is greedy; one that always fires stops every token after the first loop, whose tokens are then the
    first loop's teacher-forced exit (loop_logits_EBTV[0], the K-depth truncated model: with attention alone,
    what the skipped depths' KV is filled with is never read by a token that exits after loop 1)."""
    model, full = _full_rank()
    params = _truncated(full, 16)  # the program and prompts of test_cached_decode_equals_teacher_forced
    prompts = [[5, 7, 9, 11], [3, 1]]
    greedy = generate(model, params, prompts, max_new_tokens=5, sampler=Greedy())
    never = early_exit_generate(model, params, prompts, max_new_tokens=5, measure="softmax", threshold=1.0)
    np.testing.assert_array_equal(never.tokens_BRT, greedy.tokens_BRT)
    np.testing.assert_allclose(never.logprobs_BRT, greedy.logprobs_BRT, atol=1e-5)
    assert float(never.stats["layers_per_token"]) == N
    always = early_exit_generate(model, params, prompts, max_new_tokens=5, measure="softmax", threshold=0.0)
    assert float(always.stats["layers_per_token"]) == K == float(always.stats["executed_layers_per_call"])
    seqs = np.zeros((2, 9), np.int32)
    for i, p in enumerate(prompts):
        seqs[i, :len(p) + 5] = p + always.tokens_BRT[i, 0].tolist()
    loop1 = jax.nn.log_softmax(_forward_fn(model)(params, jnp.asarray(seqs)).aux["loop_logits_EBTV"][0])
    for i, p in enumerate(prompts):
        at = np.arange(len(p), len(p) + 4)  # the first token comes from the full-depth prefill
        np.testing.assert_array_equal(always.tokens_BRT[i, 0, 1:], np.argmax(loop1[i, at], -1))
        np.testing.assert_allclose(always.logprobs_BRT[i, 0, 1:], loop1[i, at, seqs[i, at + 1]], atol=1e-4)
    assert not np.array_equal(always.tokens_BRT, greedy.tokens_BRT)
    with pytest.raises(ValueError, match="loop_exits=True"):  # no loop exits: nothing to stop at
        early_exit_generate(build(model.cfg.replace(recursion=RecursionConfig(K, R))), None, prompts,
                            max_new_tokens=5)


def test_trains_shared_and_lora_params():
    model, full = _full_rank()
    params = _truncated(full, 16)
    opt = optax.adam(1e-2)

    def loss_fn(p):  # the final logits and the first loop's exit, as in exit training
        out = model.apply({"params": p}, TOKENS_BT[:, :-1])
        ce = lambda logits_BTV: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            logits_BTV, TOKENS_BT[:, 1:]).mean()
        return ce(out.logits_BTV) + ce(out.aux["loop_logits_EBTV"][0])

    @jax.jit
    def train_step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, grads

    opt_state, losses = opt.init(params), []
    for _ in range(5):
        params, opt_state, loss, grads = train_step(params, opt_state)
        losses.append(float(loss))
        if len(losses) == 1:
            lora, shared = grads["lora"], grads["layers"]
            for g in (shared["attn"]["q"], shared["mlp_norm"]["scale"], lora["attn"]["q"]["a"],
                      lora["mlp"]["down"]["b"], lora["attn"]["k_bias"], grads["embed"]["embedding"]):
                assert float(jnp.abs(g).max()) > 0
    assert losses[-1] < losses[0] - 0.1, losses


def test_fewer_params_than_the_base():
    _, base_params = _base()
    model, params = tiny_model("qwen2-tiny", num_layers=N, recursion=RecursionConfig(K, 8))
    assert isinstance(model, RecursiveLM)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    layer = count(base_params["layers"]) // N
    lora = N * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 192) + (192 + 64))  # q, k v, o, gate up, down
    lora += N * (64 + 32 + 32)  # the q, k, v bias offsets
    assert count(params["lora"]) == lora
    assert count(params["layers"]) == K * layer
    assert count(params) == count(base_params) - (N - K) * layer + lora < count(base_params)
    assert count(params) == param_count(model.cfg)


def test_bad_input():
    with pytest.raises(ValueError, match="num_unique=0"):
        RecursionConfig(0)
    with pytest.raises(ValueError, match="lora_rank=-1"):
        RecursionConfig(2, -1)
    with pytest.raises(ValueError, match="sharing='sequence'"):
        RecursionConfig(2, sharing="sequence")
    with pytest.raises(ValueError, match=r"num_layers=3 is not a multiple of recursion.num_unique=2"):
        build(preset("llama-tiny", num_layers=3, recursion=RecursionConfig(2)))
    with pytest.raises(ValueError, match=r"only 'attn' layers; layer_pattern has \['ssm'\]"):
        build(preset("hybrid-tiny", recursion=RecursionConfig(2)))
    with pytest.raises(TypeError, match="RecursionConfig"):
        build(preset("llama-tiny", recursion=4))
    base_model, base_params = _base()
    with pytest.raises(ValueError, match=r"num_layers=4 is not a multiple of recursion.num_unique=3"):
        from_base(base_model.cfg, base_params, RecursionConfig(3, 4))
