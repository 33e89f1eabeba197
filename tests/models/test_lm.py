"""Decoder LM: config validation, cached decode == teacher-forced forward, packed segments, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import (
    AttentionConfig,
    ModelConfig,
    RopeScaling,
    build,
    decode_params,
    init_params,
    init_state,
    preset,
    truncate,
)
from lmx.models.lm import embed, head, make_ctx, run_layers
from tests.tiny import tiny_model

PRESETS = ["llama-tiny", "llama3-tiny", "qwen2-tiny", "swa-tiny"]


def _model(name, **kw):
    model, params = tiny_model(name, **kw)
    return model.cfg, model, params


def _jitted(model):
    """Jitted forward with and without state: eager op-by-op apply is far slower to run on CPU."""
    full = jax.jit(lambda p, t: model.apply({"params": p}, t).logits_BTV)
    cached = jax.jit(lambda p, t, s: model.apply({"params": p}, t, state=s))
    return full, cached


@pytest.mark.parametrize("name", PRESETS)
def test_cached_decode_equals_teacher_forced(name):
    cfg, model, params = _model(name)
    full, cached = _jitted(model)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (3, 20), 0, cfg.vocab_size)
    full_BTV = full(params, tokens_BT)
    state = init_state(cfg, 3, 24)
    chunks, logits = [0, 7, 8, 11, 12, 16, 20], []  # prefill, single tokens, and multi-token chunks
    for a, b in zip(chunks[:-1], chunks[1:], strict=False):
        out = cached(params, tokens_BT[:, a:b], state)
        state = out.state
        logits.append(out.logits_BTV)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full_BTV, atol=1e-5)
    assert state.lengths_B.tolist() == [20, 20, 20]


def test_layer_loop_in_pieces_equals_the_scanned_stack():
    """decode_params splits the stack once per params object; embed -> run_layers [0, a) -> run_layers [a, L) ->
    head gives the scanned stack's logits, without a state and with one (a prefill, then a single token); on a
    hybrid, so both block kinds run, at batch 1 (the KV write's one-row path)."""
    cfg, model, params = _model("hybrid-tiny")
    split = decode_params(model, params)
    assert decode_params(model, params) is split and decode_params(model, split) is split  # cached, not re-split
    assert len(split.layers) == cfg.num_layers and decode_params(model, dict(params)) is split  # same arrays
    full, _ = _jitted(model)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (1, 13), 0, cfg.vocab_size)
    full_BTV = full(params, tokens_BT)

    def pieces(split, tokens_BT, state, a):
        T = tokens_BT.shape[1]
        lengths_B = jnp.zeros((1,), jnp.int32) if state is None else state.lengths_B
        ctx = make_ctx(lengths_B, T)
        states = None if state is None else state.layers
        x, first = run_layers(model, split, embed(model, split, tokens_BT), None if states is None else states[:a],
                              ctx, 0, a)
        x, rest = run_layers(model, split, x, None if states is None else states[a:], ctx, a)
        logits, _ = head(model, split, x)
        return logits, None if state is None else state.replace(lengths_B=lengths_B + T, layers=first + rest)

    pieces = jax.jit(pieces, static_argnums=3)
    np.testing.assert_allclose(pieces(split, tokens_BT, None, 3)[0], full_BTV, atol=1e-5)
    state = init_state(cfg, 1, 16)
    for a, b in [(0, 12), (12, 13)]:
        logits, state = pieces(split, tokens_BT[:, a:b], state, 2)
        np.testing.assert_allclose(logits, full_BTV[:, a:b], atol=1e-5)
    with pytest.raises(ValueError, match=r"layers \[2, 9\) outside the model's 8 layers"):
        run_layers(model, split, jnp.zeros((1, 1, cfg.d_model)), None, make_ctx(jnp.zeros((1,), jnp.int32), 1), 2, 9)


@pytest.mark.parametrize("name", PRESETS)
def test_right_padded_prefill_then_truncate(name):
    """Rows of unequal length prefilled together, truncated, then decoded, match each row run alone."""
    cfg, model, params = _model(name)
    full, cached = _jitted(model)
    rng = np.random.default_rng(0)
    lens = [5, 9, 3]
    seqs_BT = rng.integers(0, cfg.vocab_size, (3, max(lens) + 4)).astype(np.int32)  # prompt + 4 more each
    ref_BTV = full(params, jnp.asarray(seqs_BT))  # causal: a row's later tokens never affect earlier logits
    pad_BT = np.zeros((3, max(lens)), np.int32)
    for b, n in enumerate(lens):
        pad_BT[b, :n] = seqs_BT[b, :n]
    state = cached(params, jnp.asarray(pad_BT), init_state(cfg, 3, 16)).state
    state = truncate(state, jnp.asarray(lens))
    for i in range(4):
        step_B1 = jnp.asarray([[seqs_BT[b, n + i]] for b, n in enumerate(lens)], jnp.int32)
        out = cached(params, step_B1, state)
        state = out.state
        for b, n in enumerate(lens):
            np.testing.assert_allclose(out.logits_BTV[b, 0], ref_BTV[b, n + i], atol=1e-5)


def test_packed_segments_match_separate_sequences():
    cfg, model, params = _model("llama-tiny")
    a, b = np.arange(3, 10), np.arange(20, 25)
    tokens = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    out = model.apply({"params": params}, jnp.asarray(tokens), positions_BT=jnp.asarray(pos),
                      segment_ids_BT=jnp.asarray(seg)).logits_BTV
    ref_a = model.apply({"params": params}, jnp.asarray(a[None])).logits_BTV
    ref_b = model.apply({"params": params}, jnp.asarray(b[None])).logits_BTV
    np.testing.assert_allclose(out[:, :7], ref_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:12], ref_b, atol=1e-5)


def test_sliding_window_limits_context():
    cfg, model, params = _model("swa-tiny")  # window 8
    t = jax.random.randint(jax.random.PRNGKey(2), (1, 20), 0, cfg.vocab_size)
    # 2 layers x window 8: position 19 sees back to position 19 - 2*7 = 5, so tokens 0..4 cannot matter.
    t2 = t.at[0, 0:5].set((t[0, 0:5] + 1) % cfg.vocab_size)
    l1 = model.apply({"params": params}, t).logits_BTV[0, -1]
    l2 = model.apply({"params": params}, t2).logits_BTV[0, -1]
    assert float(jnp.abs(l1 - l2).max()) < 1e-6
    # Within the window the change must matter.
    l3 = model.apply({"params": params}, t.at[0, 18].set((t[0, 18] + 1) % cfg.vocab_size)).logits_BTV[0, -1]
    assert float(jnp.abs(l1 - l3).max()) > 1e-4


def test_remat_and_bf16_match_the_plain_f32_model():
    cfg, model, params = _model("llama-tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)

    def logits_and_grads(m):
        f = lambda p: m.apply({"params": p}, tokens).logits_BTV
        return jax.jit(lambda p: (f(p), jax.grad(lambda q: jnp.mean(f(q) ** 2))(p)))(params)

    want_logits, want_grads = logits_and_grads(model)
    # remat recomputes the same f32 ops in the backward pass: equal up to float reassociation.
    logits, grads = logits_and_grads(build(cfg.replace(remat=True)))
    np.testing.assert_allclose(logits, want_logits, atol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), grads, want_grads)
    # bf16 activations (f32 params, f32 softmax and logits): bf16 has 8 mantissa bits (relative step 2^-8 =
    # 0.004); through two layers the logits (of scale ~1 here) stay within 0.05 of f32's.
    logits, grads = logits_and_grads(build(cfg.replace(dtype="bfloat16")))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want_logits, atol=0.05)
    scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_grads))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=0.05 * scale), grads, want_grads)


def test_truncate_never_moves_lengths_forward():
    cfg = preset("hybrid-tiny")  # attention and SSM layers
    state = init_state(cfg, 3, 8)
    floored = lambda x: x.replace(floor_B=jnp.asarray([0, 1, 0])) if hasattr(x, "floor_B") else x
    state = state.replace(lengths_B=jnp.asarray([3, 5, 0]), layers=tuple(map(floored, state.layers)))
    assert truncate(state, [4, 2, 7]).lengths_B.tolist() == [3, 2, 0]
    assert jax.jit(truncate)(state, jnp.asarray([9, 1, 1])).lengths_B.tolist() == [3, 1, 0]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads=6"),
        (dict(head_dim=15), "head_dim=15"),
        (dict(num_heads=0), "num_heads=0"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(impl="cuda"), "impl='cuda'"),
    ],
)
def test_invalid_attention_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AttentionConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(dtype="float8"), "dtype='float8'"),
        (dict(num_layers=2, layer_pattern=("attn",)), "num_layers=2"),
        (dict(layer_pattern=("attn", "mlp")), "unknown kinds"),
        (dict(norm_eps=-1.0), "norm_eps=-1.0"),
    ],
)
def test_invalid_model_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_invalid_rope_scaling_and_preset():
    with pytest.raises(ValueError, match="kind='yarn'"):
        RopeScaling(kind="yarn")
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        preset("gpt-5")


def test_call_past_the_cache_is_refused():
    cfg, model, params = _model("llama-tiny")
    state = init_state(cfg, 2, 8)
    with pytest.raises(ValueError, match="needs 9 cache positions, but the decode state holds max_len=8"):
        model.apply({"params": params}, jnp.zeros((2, 9), jnp.int32), state=state)


def test_logits_at_one_position_per_row():
    cfg, model, params = _model("llama-tiny")
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 7)), jnp.int32)
    full_BTV = model.apply({"params": params}, tokens_BT).logits_BTV
    at_B = jnp.asarray([6, 0, 3])
    out = model.apply({"params": params}, tokens_BT, state=init_state(cfg, 3, 8), logits_at_B=at_B)
    assert out.logits_BTV.shape == (3, 1, 128) and out.state.lengths_B.tolist() == [7] * 3
    np.testing.assert_allclose(out.logits_BTV[:, 0], full_BTV[jnp.arange(3), at_B], atol=1e-5)
    with pytest.raises(ValueError, match=r"logits_at_B=\[7, 0, 3\] must hold indices in \[0, 7\)"):
        model.apply({"params": params}, tokens_BT, logits_at_B=jnp.asarray([7, 0, 3]))
    at_BK = jnp.asarray([[6, 1], [0, 0], [3, 5]])  # K = 2 positions per row (RL scores completion positions)
    out = model.apply({"params": params}, tokens_BT, logits_at_B=at_BK)
    assert out.logits_BTV.shape == (3, 2, 128)
    np.testing.assert_allclose(out.logits_BTV, full_BTV[jnp.arange(3)[:, None], at_BK], atol=1e-5)


def test_token_ids_outside_vocab():
    cfg, model, params = _model("llama-tiny")
    with pytest.raises(ValueError, match=r"\[128\] outside the vocabulary \[0, 128\)"):
        model.apply({"params": params}, jnp.asarray([[1, 2, 128]]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        model.apply({"params": params}, jnp.asarray([[-1, 2]]))


def test_real_presets_shapes_only():
    # The parameter counts the released checkpoints have (tied embeddings): 1,235,814,400 for Llama-3.2-1B and
    # 494,032,768 for Qwen2.5-0.5B.
    for name, want in [("llama3.2-1b", 1_235_814_400), ("qwen2.5-0.5b", 494_032_768)]:
        cfg = preset(name)
        shapes = jax.eval_shape(functools.partial(init_params, build(cfg)), jax.random.PRNGKey(0))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == want, name


def test_replace_num_layers_retiles_pattern():
    cfg = preset("llama-tiny", num_layers=5)
    assert cfg.layer_pattern == ("attn",) * 5


def test_writes_past_max_len_inside_jit_are_clamped_and_reported():
    """Inside a jitted loop nothing can raise: a row that runs out of positions is flagged (overflow_B) and its
    writes land in its own last slot, never outside its buffers; the other rows are untouched and exact."""
    cfg, model, params = _model("llama-tiny")
    full, cached = _jitted(model)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    state = cached(params, tokens_BT[:, :4], init_state(cfg, 2, 8)).state
    state = truncate(state, jnp.asarray([4, 1]))  # row 0 at length 4, row 1 at length 1

    @jax.jit
    def loop(state):
        def body(i, carry):
            state, logits = carry
            out = model.apply({"params": params}, tokens_BT[:, 4 + i][:, None], state=state)
            return out.state, logits.at[:, i].set(out.logits_BTV[:, 0])
        return jax.lax.fori_loop(0, 6, body, (state, jnp.zeros((2, 6, cfg.vocab_size))))

    out_state, logits = loop(state)
    assert out_state.overflow_B.tolist() == [True, False]  # row 0 needed 10 positions of 8, row 1 needed 7
    assert out_state.layers[0].k_BKHS.shape == state.layers[0].k_BKHS.shape
    # Row 1 (positions 1..6 fed tokens 4..9) is exact; row 0 was exact until it ran out (its first 4 steps).
    seq1 = jnp.concatenate([tokens_BT[1:, :1], tokens_BT[1:, 4:10]], axis=1)
    np.testing.assert_allclose(logits[1], full(params, seq1)[0, 1:], atol=1e-5)
    np.testing.assert_allclose(logits[0, :4], full(params, tokens_BT[:1, :8])[0, 4:], atol=1e-5)
