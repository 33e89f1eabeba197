"""Early exits in the LM: each exit's logits equal the truncated model's (layers [0, e) + its norm + the shared
head), exits change nothing else, the LayerSkip and JEI-DNN losses against their formulas, the JEI-DNN exit
distribution sums to 1; LayerSkip's layer dropout follows its depth schedule, skips each row's dropped layers and
leaves the program unchanged without an rng; the DYNAMAX exit classifier's loss, training and decode state; bad
configs fail naming the value."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import build, decode_params, embed, head, init_params, init_state, make_ctx, preset, run_layers
from lmx.models.early_exit import (
    ExitConfig,
    exit_distribution,
    layer_dropout_rates,
    layer_keep,
    layerskip_loss,
    make_jei_loss,
)
from lmx.models.exit_classifier import ROLLBACK, classifier_loss, lost_rows, with_classifiers
from tests.tiny import HYBRID_2X2

TOKENS_BT = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 7)), jnp.int32)


@pytest.fixture(scope="module")
def exits_model():
    cfg = preset("llama-tiny", num_layers=3, exits=ExitConfig(layers=(1, 2), per_exit_norm=True, gates=True))
    model = build(cfg)
    params = init_params(model, jax.random.key(0))
    # Distinct exit norms, so a wrong norm shows.
    params["exit_norm_1"]["scale"] = params["exit_norm_1"]["scale"] * 1.5
    return model, params, model.apply({"params": params}, TOKENS_BT)


def test_exit_logits_are_the_truncated_models(exits_model):
    model, params, out = exits_model
    dp = decode_params(model, params)
    x = embed(model, dp, TOKENS_BT)
    ctx = make_ctx(jnp.zeros(2, jnp.int32), 7)
    for e, l in enumerate(model.cfg.exits.layers):
        h, _ = run_layers(model, dp, x, None, ctx, 0, l)
        want = head(model, dp, h, norm=f"exit_norm_{e}")[0]
        np.testing.assert_allclose(out.aux["exit_logits_EBTV"][e], want, atol=2e-5)
        kernel, bias = params[f"exit_gate_{e}"]["kernel"], params[f"exit_gate_{e}"]["bias"]
        g = jax.nn.sigmoid(head(model, dp, h, norm=f"exit_norm_{e}")[1] @ kernel + bias)[..., 0]
        np.testing.assert_allclose(out.aux["exit_gates_EBT"][e], g, atol=1e-6)


def test_exits_leave_the_final_logits_and_the_base_params_unchanged(exits_model):
    model, params, out = exits_model
    base = build(preset("llama-tiny", num_layers=3))
    base_params = {k: v for k, v in params.items() if not k.startswith("exit_")}
    assert jax.tree.structure(base_params) == jax.tree.structure(init_params(base, jax.random.key(0)))
    np.testing.assert_array_equal(out.logits_BTV, base.apply({"params": base_params}, TOKENS_BT).logits_BTV)


def _ce(logits_BTV, mask_BT):
    logp = jax.nn.log_softmax(np.asarray(logits_BTV, np.float64)[:, :-1], -1)
    ce_BT = -np.take_along_axis(logp, np.asarray(TOKENS_BT)[:, 1:, None], -1)[..., 0]
    return ce_BT, mask_BT[:, 1:]


def test_layerskip_and_jei_losses_follow_their_formulas(exits_model):
    model, params, out = exits_model
    mask_BT = np.ones((2, 7), np.float32)
    mask_BT[1, :3] = 0
    batch = {"tokens_BT": TOKENS_BT, "loss_mask_BT": jnp.asarray(mask_BT)}
    all_logits = [*out.aux["exit_logits_EBTV"], out.logits_BTV]
    ce = [(c * m).sum() / m.sum() for c, m in (_ce(lg, mask_BT) for lg in all_logits)]
    loss, metrics = layerskip_loss(model, params, batch, None)
    np.testing.assert_allclose(loss, (ce[-1] + ce[0] + ce[1]) / 3, rtol=1e-5)  # loss_weight 1: a plain mean
    np.testing.assert_allclose(metrics["ce_exit2"], ce[1], rtol=1e-5)

    g = np.asarray(out.aux["exit_gates_EBT"], np.float64)[:, :, :-1]
    p = np.stack([g[0], (1 - g[0]) * g[1], (1 - g[0]) * (1 - g[1])])  # by hand: exit at 1, at 2, full depth
    per = sum(p[i] * (_ce(all_logits[i], mask_BT)[0] + 0.3 * d / 3) for i, d in enumerate((1, 2, 3)))
    loss, metrics = make_jei_loss(0.3)(model, params, batch, None)
    np.testing.assert_allclose(loss, (per * mask_BT[:, 1:]).sum() / mask_BT[:, 1:].sum(), rtol=1e-5)
    depth = (sum(p[i] * d for i, d in enumerate((1, 2, 3))) * mask_BT[:, 1:]).sum() / mask_BT[:, 1:].sum()
    np.testing.assert_allclose(metrics["expected_depth"], depth, rtol=1e-5)


def test_jei_exit_distribution_sums_to_one():
    g = jax.random.uniform(jax.random.key(1), (4, 3, 5))
    p = exit_distribution(g)
    assert p.shape == (5, 3, 5) and (p >= 0).all()
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(exit_distribution(jnp.ones((2, 1, 1)))[:, 0, 0], [1, 0, 0])  # the first gate takes all


@pytest.mark.parametrize("exits, match", [
    (ExitConfig(layers=(3,)), r"exits \[3\] are not below num_layers=3"),
    (ExitConfig(layers=(1, 5)), r"exits \[5\]"),
])
def test_exits_outside_the_stack_fail_naming_them(exits, match):
    with pytest.raises(ValueError, match=match):
        build(preset("llama-tiny", num_layers=3, exits=exits))


@pytest.mark.parametrize("kw, match", [(dict(layers=()), r"layers=\(\)"), (dict(layers=(0, 2)), r"layers=\(0, 2\)"),
                                       (dict(layers=(2, 1)), r"layers=\(2, 1\)"), (dict(layers=(1.5,)), "ints"),
                                       (dict(layers=(1,), loss_weight=-1.0), "loss_weight=-1.0"),
                                       (dict(layers=(1,), layer_dropout=1.0), r"layer_dropout=1.0 must be in \[0, 1\)"),
                                       (dict(layers=(1,), layer_dropout=-0.1), "layer_dropout=-0.1"),
                                       (dict(layers=(1,), layer_dropout=float("nan")), "layer_dropout=nan"),
                                       (dict(layers=(1,), classifier="lstm"), "classifier='lstm'"),
                                       (dict(layers=(1,), classifier="mamba", classifier_dim=6), "classifier_dim=6"),
                                       (dict(layers=(1,), classifier="mamba", classifier_weight=-1.0),
                                        "classifier_weight=-1.0"),
                                       (dict(layers=(1,), classifier_dim=32), "no effect with classifier=None")])
def test_bad_exit_configs_fail_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ExitConfig(**kw)


def test_hybrid_exits_sit_on_the_scanned_unit_and_jei_needs_gates():
    with pytest.raises(ValueError, match="multiples of the layer pattern's repeating unit"):
        build(preset("hybrid-tiny", exits=ExitConfig(layers=(1,))))
    model = build(preset("llama-tiny", num_layers=2, exits=ExitConfig(layers=(1,))))
    params = init_params(model, jax.random.key(0))
    with pytest.raises(ValueError, match="needs exit gates"):
        make_jei_loss(0.1)(model, params, {"tokens_BT": TOKENS_BT, "loss_mask_BT": jnp.ones((2, 7))}, None)


# ---------------------------------------------------------------------------------------------- layer dropout

HYBRID = HYBRID_2X2  # a two-kind scanned unit (Unit's own dropout path)


def test_layer_dropout_rates_follow_the_depth_schedule():
    """p_l = (2^{l/(L-1)} - 1)·p_max: never layer 0, p_max at the last; the draws follow it per row and layer."""
    cfg = preset("hybrid-tiny", **HYBRID, exits=ExitConfig(layers=(2,), layer_dropout=0.8))
    rates = np.array([0.0, 2 ** (1 / 3) - 1, 2 ** (2 / 3) - 1, 1.0]) * 0.8
    np.testing.assert_allclose(layer_dropout_rates(cfg), rates, rtol=1e-6)
    B = 20000
    keep_UBK = np.asarray(layer_keep(cfg, jax.random.key(3), B))
    assert keep_UBK.shape == (2, B, 2)  # (ssm, attn) twice: the scan's per-unit input
    dropped_L = 1 - keep_UBK.transpose(0, 2, 1).reshape(4, B).mean(1)
    assert dropped_L[0] == 0
    assert np.all(np.abs(dropped_L - rates) < 4.5 * np.sqrt(rates * (1 - rates) / B) + 1e-9), dropped_L


@pytest.mark.parametrize("name, overrides, grads", [("llama-tiny", dict(num_layers=4), True),
                                                   ("hybrid-tiny", HYBRID, False)])
def test_layer_dropout_skips_each_rows_dropped_layers(tiny, name, overrides, grads):
    """With a "dropout" rng a dropped layer leaves the row's residual stream as it was (checked against the
    layer-loop pieces with the same draws, exit logits included); the exit loss passes the trainer's rng, and
    gradients reach every layer."""
    model, params = tiny(name, exits=ExitConfig(layers=(2,), layer_dropout=0.6), **overrides)
    B = 8
    tokens_BT = jnp.asarray(np.random.default_rng(1).integers(1, 128, (B, 3)), jnp.int32)
    batch = {"tokens_BT": tokens_BT, "loss_mask_BT": jnp.ones((B, 3))}

    @jax.jit
    def run(params, rng):
        out = model.apply({"params": params}, tokens_BT, rngs={"dropout": rng})
        if not grads:
            return out, None, None
        (_, metrics), grad = jax.value_and_grad(layerskip_loss, 1, has_aux=True)(model, params, batch, rng)
        return out, metrics, grad

    @jax.jit
    def reference(params, keep_LB):  # layer by layer, each row keeping its own layers
        dp = decode_params(model, params)
        x = embed(model, dp, tokens_BT)
        ctx = make_ctx(jnp.zeros(B, jnp.int32), 3)
        for l in range(4):
            x = jnp.where(keep_LB[l][:, None, None], run_layers(model, dp, x, None, ctx, l, l + 1)[0], x)
            if l == 1:
                exit_logits = head(model, dp, x)[0]
        return head(model, dp, x)[0], exit_logits

    out, metrics, grad = run(params, jax.random.key(7))
    keep_LB = np.asarray(out.aux["layer_keep_LB"])
    assert keep_LB[0].all() and not keep_LB[1:].all() and keep_LB[1:].any(0).sum() >= 2, keep_LB  # mixed rows
    final, exit_logits = reference(params, keep_LB)
    np.testing.assert_allclose(out.logits_BTV, final, atol=2e-5)
    np.testing.assert_allclose(out.aux["exit_logits_EBTV"][0], exit_logits, atol=2e-5)
    if grads:  # the same draws (the loss got the same rng); every layer of every stacked param learns
        np.testing.assert_allclose(metrics["layers_dropped"], (~keep_LB).sum(0).mean(), rtol=1e-6)
        for path, g in jax.tree_util.tree_leaves_with_path(grad["layers"]):
            assert np.all(np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(1) > 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name, overrides", [("llama-tiny", dict(num_layers=4)), ("hybrid-tiny", HYBRID)])
def test_without_an_rng_or_at_zero_layer_dropout_the_program_is_unchanged(name, overrides):
    """Inference (no rng) never drops: the traced program is the one of the model without layer dropout, and
    layer_dropout=0 with an rng is too (so its results are bit-identical)."""
    tokens_BT = jnp.ones((2, 3), jnp.int32)

    def program(layer_dropout, rngs=None):
        model = build(preset(name, exits=ExitConfig(layers=(2,), layer_dropout=layer_dropout), **overrides))
        params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens_BT, rngs=rngs))(params))

    plain = program(0.0)
    assert program(0.5) == plain and program(0.0, {"dropout": jax.random.key(1)}) == plain
    assert program(0.5, {"dropout": jax.random.key(1)}) != plain  # the check can fail


# ------------------------------------------------------------------------------------- DYNAMAX exit classifiers


def test_classifier_loss_is_the_bce_against_agreement_with_the_final_head():
    rng = np.random.default_rng(2)
    z_EBT, exit_EBTV, final_BTV = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(3, 5, 4))
    exit_EBTV[0, :, :, 0] = final_BTV[..., 0] = 9.0  # exit 0 always agrees
    mask_BT = (np.arange(5)[None] >= np.array([[1], [3], [5]])).astype(np.float32)  # row 2: nothing to predict
    bce, agreement = classifier_loss(z_EBT, exit_EBTV, final_BTV, mask_BT)
    y_EBT = (exit_EBTV.argmax(-1) == final_BTV.argmax(-1)).astype(float)[:, :, :-1]
    w_EBT = np.broadcast_to(mask_BT[:, 1:], y_EBT.shape)
    per_EBT = np.logaddexp(0, z_EBT[:, :, :-1]) - y_EBT * z_EBT[:, :, :-1]  # -log σ(z) or -log(1 - σ(z))
    np.testing.assert_allclose(bce, (per_EBT * w_EBT).sum() / w_EBT.sum(), rtol=1e-5)
    np.testing.assert_allclose(agreement, (y_EBT * w_EBT).sum() / w_EBT.sum(), rtol=1e-6)
    assert 0 < agreement < 1


def test_exit_classifier_trains_and_its_decode_state_follows_teacher_forcing(tiny):
    """The classifier's BCE is added to the LayerSkip loss; its gradient reaches only the classifier (the exit state
    it reads is a stop-gradient), and a few gradient steps on it lower it. Decoding with a state (a prefill, then
    one token at a time) advances each exit's classifier state so that its confidences are the teacher-forced ones."""
    model, params = tiny("llama-tiny", num_layers=2, exits=ExitConfig(layers=(1,), classifier="mamba"))
    batch = {"tokens_BT": TOKENS_BT, "loss_mask_BT": jnp.ones((2, 7))}

    def bce(params):
        loss, metrics = layerskip_loss(model, params, batch, None)
        return metrics["classifier_bce"], (loss, metrics)

    @jax.jit
    def train_step(params):  # gradient descent on the BCE
        (_, (loss, metrics)), grads = jax.value_and_grad(bce, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss, metrics, grads

    @jax.jit
    def cached_and_teacher_forced(params):
        state, confs = init_state(model.cfg, 2, 16), []
        for a, b in ((0, 5), (5, 6), (6, 7)):
            out = model.apply({"params": params}, TOKENS_BT[:, a:b], state=state)
            confs.append(out.aux["exit_confidence_EBT"])
            state = out.state
        tf = model.apply({"params": params}, TOKENS_BT).aux
        return jnp.concatenate(confs, axis=2), state, tf["exit_confidence_EBT"], tf["exit_classifier_logits_EBT"]

    conf, state, want, logits = cached_and_teacher_forced(params)
    assert type(state).__name__ == "ExitDecodeState" and len(state.classifiers) == 1
    np.testing.assert_allclose(conf, want, atol=1e-5)
    np.testing.assert_allclose(want, jax.nn.sigmoid(logits), rtol=1e-6)
    bces = []
    for i in range(4):
        params, loss, metrics, grads = train_step(params)
        bces.append(float(metrics["classifier_bce"]))
        if i == 0:
            np.testing.assert_allclose(loss, (metrics["ce_final"] + metrics["ce_exit1"]) / 2 + bces[0], rtol=1e-6)
            for name, g in grads.items():
                assert (float(jnp.abs(jax.flatten_util.ravel_pytree(g)[0]).max()) > 0) == (name == "exit_classifier_0")
    assert bces[-1] < bces[0] - 0.05, bces


def test_classifier_states_flag_rows_rolled_back_past_their_rings():
    """A classifier state remembers the last ROLLBACK positions of its rings: a row whose length falls below that
    (its floor) is reported (the decode calls set overflow_B), the others are not."""
    cfg = preset("llama-tiny", num_layers=2, exits=ExitConfig(layers=(1,), classifier="mamba"))
    state = with_classifiers(cfg, init_state(cfg, 3, 64))
    assert with_classifiers(cfg, state) is state and state.classifiers[0].ssm_BQNHZ.shape[1] == ROLLBACK + 1
    floors = jnp.array([0, 20, 20])
    state = state.replace(lengths_B=jnp.array([5, 19, 20]),
                          classifiers=(state.classifiers[0].replace(floor_B=floors),))
    assert lost_rows(state).tolist() == [False, True, False]
