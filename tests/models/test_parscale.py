"""ParScale: P = 1 is the base model; P = 2 matches a numpy reference of the paper's forward and its cached decode
matches teacher forcing (generate, forward with a state, repeat / select keeping a sample's streams together);
HF base weights load at P = 1 logit-exact; post-training moves only the ParScale params; bad configs fail clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmx.models as lm
from lmx.decoding.generate import generate
from lmx.decoding.sampling import Greedy
from lmx.models.parscale import (
    ParScaleConfig,
    StreamsKVState,
    add_parscale_params,
    aggregate,
    parscale_only,
    trainable_mask,
)
from lmx.train.optim import OptimConfig, make_optimizer

PS2 = ParScaleConfig(P=2, n_prefix=5)  # odd n_prefix: a slot-layout mistake cannot line up by chance


@pytest.fixture(scope="module")
def ps2(tiny):
    """(model, params, jitted teacher-forced apply, jitted apply with a state) of llama-tiny (GQA 4/2 heads,
    2 layers) with P = 2. The tests share the shapes they call these on: each new shape is a compilation."""
    model, params = tiny("llama-tiny", parscale=PS2)
    return (model, params, jax.jit(lambda p, t: model.apply({"params": p}, t)),
            jax.jit(lambda p, t, s: model.apply({"params": p}, t, state=s)))


TOKENS = np.random.default_rng(1).integers(0, 128, (2, 10)).astype(np.int32)


def test_p1_is_the_base_model(tiny):
    """P = 1 builds the base LM itself, with the base params and decode state (its logits equal the base model's
    on the same weights: test_hf_base_weights_stay_logit_exact_at_p1)."""
    _, base_params = tiny("llama-tiny")
    model, params = tiny("llama-tiny", parscale=ParScaleConfig(P=1))
    assert type(model) is lm.LM  # no prefix, no aggregation
    assert jax.tree.structure(params) == jax.tree.structure(base_params)
    assert all(type(s) is lm.KVState for s in lm.init_state(model.cfg, 2, 12).layers)
    assert add_parscale_params(model.cfg, base_params, jax.random.key(0)).keys() == base_params.keys()


def _rms(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _rope(x_BTNH, theta):
    H = x_BTNH.shape[-1]
    ang = np.arange(x_BTNH.shape[1])[:, None] * (1.0 / theta ** (np.arange(0, H, 2) / H))
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = np.split(x_BTNH, 2, -1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _reference_logits(cfg, params, tokens_BT):
    """The paper's forward in float64 numpy: P copies of the input; in every attention layer stream p's keys and
    values are [its prefix (unrotated), the tokens'], each query sees the whole prefix and the causal tokens;
    softmax aggregation of the final-normed streams over their (d, p)-ordered concatenation; LM head. P = 1: the
    plain decoder (no prefix, no aggregation)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    a, ps, eps = cfg.attention, cfg.parscale, cfg.norm_eps
    B, T = tokens_BT.shape
    N, K, H, n = a.num_heads, a.num_kv_heads, a.head_dim, ps.n_prefix if ps.P > 1 else 0
    visible_TS = np.concatenate([np.ones((T, n), bool), np.tril(np.ones((T, T), bool))], 1)
    streams = []
    for s in range(ps.P):
        x = p["embed"]["embedding"][tokens_BT]
        for l in range(cfg.num_layers):
            w = jax.tree.map(lambda t, l=l: t[l], p["layers"])
            h = _rms(x, w["attn_norm"]["scale"], eps)
            q = _rope(np.einsum("btd,dnh->btnh", h, w["attn"]["q"]), a.rope_theta)
            k = _rope(np.einsum("btd,dkh->btkh", h, w["attn"]["k"]), a.rope_theta)
            v = np.einsum("btd,dkh->btkh", h, w["attn"]["v"])
            prefix = lambda name, s=s, l=l: np.broadcast_to(
                p["parscale"][name][l, s].transpose(1, 0, 2), (B, n, K, H)) if n else np.zeros((B, 0, K, H))
            k = np.concatenate([prefix("prefix_k"), k], 1)[:, :, np.arange(N) // (N // K)]  # query head -> KV head
            v = np.concatenate([prefix("prefix_v"), v], 1)[:, :, np.arange(N) // (N // K)]
            scores = np.where(visible_TS, np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), -np.inf)
            prob = np.exp(scores - scores.max(-1, keepdims=True))
            o = np.einsum("bnts,bsnh->btnh", prob / prob.sum(-1, keepdims=True), v)
            x = x + o.reshape(B, T, N * H) @ w["attn"]["o"].reshape(N * H, -1)
            h = _rms(x, w["mlp_norm"]["scale"], eps)
            g = h @ w["mlp"]["gate"]
            x = x + (g / (1 + np.exp(-g)) * (h @ w["mlp"]["up"])) @ w["mlp"]["down"]
        streams.append(_rms(x, p["final_norm"]["scale"], eps))
    h_BPTD = np.stack(streams, 1)
    if ps.P == 1:
        return h_BPTD[:, 0] @ p["lm_head"], h_BPTD, None
    weights_BTP, h_BTD = _reference_aggregate(p["parscale"], h_BPTD, ps.eps)
    return h_BTD @ p["lm_head"], h_BPTD, weights_BTP


def _reference_aggregate(agg, h_BPTD, eps):
    B, P, T, D = h_BPTD.shape
    cat = np.stack([h_BPTD[:, s] for s in range(P)], -1).reshape(B, T, D * P)  # [h_0[d], h_1[d], ...] per d
    z = cat @ agg["agg_in"] + agg["agg_in_bias"]
    z = z / (1 + np.exp(-z))
    s = z @ agg["agg_out"] + agg["agg_out_bias"]
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True) * (1 - eps) + eps / P
    return w, np.einsum("btp,bptd->btd", w, h_BPTD)


def test_p2_matches_the_reference(ps2, tiny):
    model, params, full, _ = ps2
    out = full(params, TOKENS)
    ref_logits, ref_streams, ref_w = _reference_logits(model.cfg, params, TOKENS)
    np.testing.assert_allclose(out.logits_BTV, ref_logits, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(out.aux["stream_hidden_BPTD"], ref_streams, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(out.aux["stream_weights_BTP"], ref_w, atol=1e-4)
    # The prefixes make the streams differ, and the model differs from the base one on the same weights.
    assert np.abs(ref_streams[:, 0] - ref_streams[:, 1]).max() > 1e-2
    base_params = {k: v for k, v in params.items() if k != "parscale"}
    base_logits = _reference_logits(model.cfg.replace(parscale=ParScaleConfig(P=1)), base_params, TOKENS)
    assert np.abs(base_logits[0] - ref_logits).max() > 1e-2


def test_aggregation_weights_are_the_smoothed_softmax(ps2):
    """w = softmax(Linear(P·D→D) → SiLU → Linear(D→P)) (1−ε) + ε/P on the module's own params and streams:
    in the model (ε = 0.01) and in `aggregate` with a large ε so the smoothing shows; hidden_BTD = Σ_p w_p h_p."""
    model, params, full, _ = ps2
    out = full(params, TOKENS)
    h_BPTD = np.asarray(out.aux["stream_hidden_BPTD"], np.float64)
    agg = jax.tree.map(lambda a: np.asarray(a, np.float64), params["parscale"])
    w, h = _reference_aggregate(agg, h_BPTD, 0.01)
    np.testing.assert_allclose(out.aux["stream_weights_BTP"], w, atol=1e-5)
    np.testing.assert_allclose(out.aux["hidden_BTD"], h, atol=1e-5)
    got_h, got_w = aggregate(params["parscale"], out.aux["stream_hidden_BPTD"], 0.3, "float32")
    w, h = _reference_aggregate(agg, h_BPTD, 0.3)
    np.testing.assert_allclose(got_w, w, atol=1e-5)
    np.testing.assert_allclose(got_h, h, atol=1e-5)
    assert np.all(w >= 0.3 / 2 - 1e-7) and np.allclose(w.sum(-1), 1) and np.abs(w - 0.5).max() > 1e-3


def test_cached_decode_equals_teacher_forced(ps2):
    """A prefill then single tokens through model.apply with a state (its decode_forward on split params; generate
    reaches the same through lm.forward and decode_params) give the teacher-forced logits; every state leaf keeps
    [B, P] in front."""
    model, params, full, cached = ps2
    want = full(params, TOKENS).logits_BTV
    state = lm.init_state(model.cfg, 2, 12)
    assert all(leaf.shape[:2] == (2, 2) for layer in state.layers for leaf in jax.tree.leaves(layer))
    out = cached(params, TOKENS[:, :6], state)
    got = [out.logits_BTV]
    for t in range(6, 10):
        out = cached(params, TOKENS[:, t:t + 1], out.state)
        got.append(out.logits_BTV)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want, atol=1e-5)
    assert isinstance(out.state.layers[0], StreamsKVState) and out.state.lengths_B.tolist() == [10, 10]


def test_select_reorders_samples_with_their_streams(ps2):
    model, params, _, cached = ps2
    tokens = TOKENS[:, ::-1]
    state = cached(params, tokens[:, :6], lm.init_state(model.cfg, 2, 12)).state
    swapped = cached(params, tokens[::-1, 6:7], lm.select(state, jnp.array([1, 0]))).logits_BTV
    np.testing.assert_allclose(swapped, cached(params, tokens[:, 6:7], state).logits_BTV[::-1], atol=1e-6)
    repeated = lm.repeat(state, 2)
    assert repeated.layers[0].k_BPKHS.shape[:2] == (4, 2)
    np.testing.assert_array_equal(repeated.layers[1].v_BPKSH[2:], jnp.repeat(state.layers[1].v_BPKSH[1:], 2, 0))


def test_generate_greedy_with_samples_matches_teacher_forcing(ps2):
    """generate (right-padded prefill, truncate, repeat to R = 2 samples, while loop) vs the teacher-forced
    forward on each prompt + its completion: the same greedy tokens and log-probs in every sample."""
    model, params, full, _ = ps2
    prompts = [[3, 17, 9], [5, 2, 88, 41, 7, 1]]
    gen = generate(model, params, prompts, max_new_tokens=4, sampler=Greedy(), num_samples=2)
    assert gen.tokens_BRT.shape == (2, 2, 4)
    for r in range(2):  # both prompts + completions, right-padded to TOKENS' shape (one compiled program)
        seqs = np.zeros_like(TOKENS)
        for b, prompt in enumerate(prompts):
            seqs[b, :len(prompt) + 4] = prompt + np.asarray(gen.tokens_BRT[b, r]).tolist()
        logp = jax.nn.log_softmax(full(params, seqs).logits_BTV)
        for b, prompt in enumerate(prompts):
            completion = np.asarray(gen.tokens_BRT[b, r])
            logp_TV = logp[b, len(prompt) - 1:len(prompt) + 3]
            np.testing.assert_array_equal(completion, np.argmax(logp_TV, -1))
            np.testing.assert_allclose(gen.logprobs_BRT[b, r], np.take_along_axis(
                logp_TV, completion[:, None], -1)[:, 0], atol=1e-5)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(torch, a tiny random HF LlamaForCausalLM, its save_pretrained directory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, w in hf.named_parameters():  # far from HF's small init, so a wrong layout cannot hide
            w.uniform_(0.5, 1.5) if "norm" in name else w.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return torch, hf, path


def test_hf_base_weights_stay_logit_exact_at_p1(hf_llama):
    """load_hf base + ParScale P = 1 (+ its ParScale params: none) = transformers' logits, and bit-equal to the
    base model's on the same weights."""
    torch, hf, path = hf_llama
    base, base_params = lm.load_hf(path)
    cfg = base.cfg.replace(parscale=ParScaleConfig(P=1))
    model = lm.build(cfg)
    params = add_parscale_params(cfg, base_params, jax.random.key(0))
    with torch.no_grad():
        want = hf(torch.tensor(TOKENS)).logits.numpy()
    got, base_logits = jax.jit(lambda p, t: (model.apply({"params": p}, t).logits_BTV,
                                             base.apply({"params": p}, t).logits_BTV))(params, TOKENS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(got, base_logits)
    with pytest.raises(ValueError, match="mismatched"):
        add_parscale_params(cfg.replace(d_model=48), base_params, jax.random.key(0))


def test_post_training_moves_only_parscale_params(hf_llama):
    """HF base + fresh P = 2 params; one AdamW step through `parscale_only` leaves every base weight bit-equal
    and changes every ParScale param."""
    base, base_params = lm.load_hf(hf_llama[2])
    cfg = base.cfg.replace(parscale=ParScaleConfig(P=2, n_prefix=3))
    model = lm.build(cfg)
    params = add_parscale_params(cfg, base_params, jax.random.key(0, impl="rbg"))  # rbg: compiles in a third
    mask = trainable_mask(params)
    assert all(jax.tree.leaves(mask["parscale"])) and not any(
        jax.tree.leaves({k: v for k, v in mask.items() if k != "parscale"}))
    opt = parscale_only(make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)))
    tokens = jnp.asarray(TOKENS)

    @jax.jit
    def train_step(params, opt_state):
        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1]).logits_BTV
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates)

    new = train_step(params, opt.init(params))
    for (path, old), changed, moved in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask),
                                           jax.tree.leaves(new), strict=True):
        if changed:
            assert np.abs(np.asarray(moved) - np.asarray(old)).max() > 0, jax.tree_util.keystr(path)
        else:
            np.testing.assert_array_equal(moved, old, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kw, match", [
    (dict(P=0), r"parscale\.P=0"), (dict(P=2.0), r"parscale\.P=2\.0"), (dict(P=True), r"parscale\.P=True"),
    (dict(P=2, n_prefix=-1), r"parscale\.n_prefix=-1"), (dict(P=2, eps=1.0), r"parscale\.eps=1\.0"),
    (dict(P=2, eps=-0.1), r"parscale\.eps=-0\.1"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ParScaleConfig(**kw)


def test_unsupported_models_fail_clearly():
    with pytest.raises(ValueError, match=r"P=2 .*'ssm' layers at \[0, 1, 2, 4, 5, 6\]"):
        lm.build(lm.preset("hybrid-tiny", parscale=ParScaleConfig(P=2)))
    with pytest.raises(ValueError, match="sliding_window=8"):
        lm.build(lm.preset("swa-tiny", parscale=ParScaleConfig(P=2)))
    with pytest.raises(ValueError, match="'ssm' layers"):
        lm.init_state(lm.preset("mamba2-tiny", parscale=ParScaleConfig(P=3)), 1, 4)
    with pytest.raises(TypeError, match="ParScaleConfig"):
        lm.build(lm.preset("llama-tiny", parscale=2))
    assert type(lm.build(lm.preset("hybrid-tiny", parscale=ParScaleConfig(P=1)))) is lm.LM  # P = 1: the base


def test_packed_segments_equal_each_sequence_alone(ps2):
    """Two sequences packed in one row (segment ids, positions restarting) give each sequence's own logits: every
    segment sees its stream's prefix and its own tokens only. Without the segment mask the second segment's
    logits differ (the negative control), so the comparison can fail."""
    model, params, apply, _ = ps2
    a, b = TOKENS[0, :6], TOKENS[1, :4]
    packed = np.concatenate([a, b])[None]
    seg = np.array([[0] * 6 + [1] * 4], np.int32)
    pos = np.array([list(range(6)) + list(range(4))], np.int32)
    out = jax.jit(lambda p, t, s, q: model.apply({"params": p}, t, positions_BT=q, segment_ids_BT=s).logits_BTV)
    got = np.asarray(out(params, packed, seg, pos))[0]
    alone = np.asarray(apply(params, TOKENS).logits_BTV)  # each row alone; causal, so prefixes of a row agree
    np.testing.assert_allclose(got[:6], alone[0, :6], atol=2e-5)
    np.testing.assert_allclose(got[6:], alone[1, :4], atol=2e-5)
    unmasked = np.asarray(out(params, packed, np.zeros_like(seg), pos))[0]
    assert np.abs(unmasked[6:] - alone[1, :4]).max() > 1e-3
    with pytest.raises(ValueError, match="segment_ids_BT"):
        model.apply({"params": params}, packed, state=lm.init_state(model.cfg, 1, 12), segment_ids_BT=seg)
