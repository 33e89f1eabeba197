"""Early exits in the LM: each exit's logits equal the truncated model's (layers [0, e) + its norm + the shared
head), exits change nothing else, the LayerSkip and JEI-DNN losses against their formulas, the JEI-DNN exit
distribution sums to 1, and bad configs fail naming the value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import build, decode_params, embed, head, init_params, make_ctx, preset, run_layers
from lmx.models.early_exit import ExitConfig, exit_distribution, layerskip_loss, make_jei_loss

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
                                       (dict(layers=(1,), loss_weight=-1.0), "loss_weight=-1.0")])
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
