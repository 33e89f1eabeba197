"""GRPO-family losses, KL estimators and advantages vs direct NumPy transcriptions of the papers' formulas.

The NumPy references below are written token by token (loops, no shared code with lmx.train.rl) and give the
analytic gradient d loss / d log π_θ too, so jax.grad of each lmx loss is checked against an independent formula.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.train import rl

X, T = 6, 7


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, (X, T))
    old = logp + rng.normal(0.0, 0.3, (X, T))
    old[0, 1], old[1, 2], old[2, 0] = logp[0, 1] - 2.5, logp[1, 2] - 2.5, logp[2, 0] + 2.5  # ρ ≈ 12, 12, 0.08
    ref = logp + rng.normal(0.0, 0.5, (X, T))
    adv = rng.normal(0.0, 1.0, X)
    adv[1] = -abs(adv[1]) - 0.5  # row 1: Â < 0 with ρ ≈ 12 at token 2 → the dual clip binds
    adv[0] = abs(adv[0]) + 0.5   # row 0: Â > 0 with ρ ≈ 12 → clipped high
    lengths = np.array([7, 5, 3, 1, 0, 6])  # row 4 is all padding
    mask = np.arange(T)[None, :] < lengths[:, None]
    logp[~mask], old[~mask], ref[~mask] = 1e4, -np.inf, np.nan  # garbage at padding must never matter
    return logp, old, ref, adv, mask


def _kl_np(lp, rf, est):
    """Per-token k1/k2/k3 of KL(π_θ‖π_ref) and its derivative in log π_θ."""
    lr = rf - lp
    if est == "k1":
        return -lr, 1.0
    if est == "k2":
        return 0.5 * lr * lr, -lr
    return np.exp(lr) - lr - 1.0, 1.0 - np.exp(lr)


def _weights_np(mask, mode, max_tokens=None):
    """w[x, t] with loss = Σ w·ℓ for each aggregation mode."""
    n_x = mask.sum(1)
    seqs = (n_x > 0).sum()
    w = np.zeros(mask.shape)
    for x in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[x, t]:
                w[x, t] = {"token-mean": 1.0 / mask.sum(),
                           "seq-mean-token-mean": 1.0 / (n_x[x] * seqs),
                           "seq-sum-constant": 1.0 / (seqs * (max_tokens or mask.shape[1]))}[mode]
    return w


def _token_loss_np(logp, old, ref, adv, mask, cfg, bounded):
    """PPO/GRPO/DAPO/GPPO per token: ℓ = max(−ρÂ, −clip(ρ)Â) [dual clip: min(ℓ, −cÂ) for Â<0] + β·KL."""
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    ell, g = np.zeros(mask.shape), np.zeros(mask.shape)
    for x in range(mask.shape[0]):
        a = adv[x]
        for t in range(mask.shape[1]):
            if not mask[x, t]:
                continue
            r = np.exp(logp[x, t] - old[x, t])
            unclipped, clipped = -a * r, -a * min(max(r, lo), hi)
            if unclipped >= clipped:
                ell[x, t], g[x, t] = unclipped, -a * r
            else:  # PPO: no gradient; GPPO: the bound's gradient (1±ε)·∇log π
                ell[x, t], g[x, t] = clipped, (-a * (lo if r < lo else hi) if bounded else 0.0)
            if cfg.dual_clip_c is not None and a < 0 and ell[x, t] > -a * cfg.dual_clip_c:
                ell[x, t], g[x, t] = -a * cfg.dual_clip_c, 0.0
            if cfg.beta > 0:
                k, dk = _kl_np(logp[x, t], ref[x, t], cfg.kl_estimator)
                ell[x, t] += cfg.beta * k
                g[x, t] += cfg.beta * dk
    w = _weights_np(mask, cfg.aggregation, cfg.max_tokens)
    return (w * ell).sum(), w * g


def _gspo_np(logp, old, ref, adv, mask, cfg):
    """GSPO: s_i = exp(mean_t log ρ), ℓ_i = max(−s_iÂ_i, −clip(s_i)Â_i) on each of the row's tokens."""
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    w = _weights_np(mask, cfg.aggregation, cfg.max_tokens)
    loss, grad = 0.0, np.zeros(mask.shape)
    for x in range(mask.shape[0]):
        n = mask[x].sum()
        if n == 0:
            continue
        s = np.exp(sum(logp[x, t] - old[x, t] for t in range(mask.shape[1]) if mask[x, t]) / n)
        unclipped, clipped = -adv[x] * s, -adv[x] * min(max(s, lo), hi)
        ell, g = (unclipped, -adv[x] * s / n) if unclipped >= clipped else (clipped, 0.0)
        loss += w[x].sum() * ell
        grad[x] = np.where(mask[x], w[x].sum() * g, 0.0)
    return loss, grad


def _reference(name, cfg, *args):
    if name == "gspo":
        return _gspo_np(*args, cfg)
    return _token_loss_np(*args, cfg, bounded=(name == "gppo"))


CASES = [
    ("grpo", {}), ("grpo", {"beta": 0.04, "kl_estimator": "k1"}), ("grpo", {"beta": 0.1, "kl_estimator": "k2"}),
    ("grpo", {"beta": 0.04, "kl_estimator": "k3", "dual_clip_c": 3.0}), ("grpo", {"aggregation": "token-mean"}),
    ("dr_grpo", {}), ("dr_grpo", {"max_tokens": 16}), ("dapo", {}), ("dapo", {"aggregation": "seq-mean-token-mean"}),
    ("gspo", {}), ("gspo", {"eps_low": 0.05, "eps_high": 0.05}), ("gspo", {"eps_low": 0.05, "token_form": True}),
    ("gspo", {"aggregation": "token-mean", "eps_high": 0.1}), ("gppo", {}), ("gppo", {"beta": 0.05}),
]


def test_cases_cover_every_registered_loss():
    assert {name for name, _ in CASES} == set(rl.available_losses())
    assert set(rl.available_losses()) == {"grpo", "dr_grpo", "dapo", "gspo", "gppo"}


@pytest.mark.parametrize("name,overrides", CASES)
def test_loss_value_and_gradient_match_numpy(name, overrides):
    logp, old, ref, adv, mask = _batch()
    cfg = rl.loss_config(name, **overrides)
    want_loss, want_grad = _reference(name, cfg, logp, old, ref, adv, mask)
    fn = rl.get_loss(name)
    ref_arg = jnp.asarray(ref) if cfg.beta > 0 or overrides.get("kl_estimator") else None

    def loss(lp):
        return fn(lp, jnp.asarray(old), ref_arg, jnp.asarray(adv), jnp.asarray(mask), cfg)

    (got_loss, metrics), got_grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(got_loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-4, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(got_grad)))
    for v in metrics.values():
        assert np.isfinite(v)
    assert metrics["tokens"] == mask.sum()


def test_clip_branches_are_exercised_and_gppo_passes_gradient_through_clipped_tokens():
    logp, old, ref, adv, mask = _batch()
    args = (jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask))
    grads, metrics = {}, {}
    for name in ("dapo", "gppo"):
        cfg = rl.loss_config(name)
        g, m = jax.grad(lambda lp: rl.get_loss(name)(lp, *args, cfg), has_aux=True)(jnp.asarray(logp))  # noqa: B023
        grads[name], metrics[name] = np.asarray(g), m
    assert metrics["gppo"]["clip_frac_high"] > 0 and metrics["gppo"]["clip_frac_low"] > 0
    assert metrics["gppo"]["dual_clip_frac"] > 0
    # row 0, token 1: Â > 0 and ρ ≈ 12 > 1+ε_high — DAPO drops the gradient, GPPO passes −Â(1+ε_high)/N
    assert grads["dapo"][0, 1] == 0
    np.testing.assert_allclose(grads["gppo"][0, 1], -adv[0] * 1.28 / mask.sum(), rtol=1e-5)
    # row 1, token 2: Â < 0 and ρ ≈ 12 > c = 10 — the dual clip caps the loss: no gradient in either
    assert grads["gppo"][1, 2] == 0
    # same forward value
    lv = {n: rl.get_loss(n)(jnp.asarray(logp), *args, rl.loss_config(n, dual_clip_c=10.0))[0] for n in ("dapo", "gppo")}
    np.testing.assert_allclose(lv["dapo"], lv["gppo"], rtol=1e-6)


def test_gspo_token_form_equals_sequence_form_for_sequence_advantages():
    logp, old, _, adv, mask = _batch()
    out = {}
    for token_form in (False, True):
        cfg = rl.loss_config("gspo", eps_low=0.05, eps_high=0.05, token_form=token_form)
        f = lambda lp: rl.gspo_loss(lp, jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask), cfg)  # noqa: B023,E731
        out[token_form] = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(out[False][0][0], out[True][0][0], rtol=1e-6)
    np.testing.assert_allclose(out[False][1], out[True][1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="advantages_X"):
        rl.gspo_loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.ones((X, T)), jnp.asarray(mask),
                     rl.loss_config("gspo"))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo", "gppo"])
def test_first_update_ratio_is_exactly_one(name):
    logp, _, ref, adv, mask = _batch()
    cfg = rl.loss_config(name)
    lp = jnp.asarray(logp, jnp.float32)
    f = lambda lp_: rl.get_loss(name)(lp_, lp, None, jnp.asarray(adv), jnp.asarray(mask), cfg)  # noqa: E731
    (loss, m), grad = jax.value_and_grad(f, has_aux=True)(lp)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0
    w = _weights_np(mask, cfg.aggregation, cfg.max_tokens)  # ρ = 1: loss = −Σ w·Â, gradient = −w·Â
    np.testing.assert_allclose(loss, -(w * adv[:, None]).sum(), rtol=1e-6)
    np.testing.assert_allclose(grad, -w * adv[:, None], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo", "gppo"])
def test_padding_changes_nothing(name):
    logp, old, ref, adv, mask = _batch()
    cfg = rl.loss_config(name, beta=0.04)

    def run(lp, od, rf):
        f = lambda lp_: rl.get_loss(name)(lp_, jnp.asarray(od), jnp.asarray(rf), jnp.asarray(adv),  # noqa: E731
                                          jnp.asarray(mask), cfg)
        return jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp))

    (l1, m1), g1 = run(logp, old, ref)
    lp2, od2, rf2 = logp.copy(), old.copy(), ref.copy()
    lp2[~mask], od2[~mask], rf2[~mask] = -np.inf, 3.0, -7.0
    (l2, m2), g2 = run(lp2, od2, rf2)
    assert l1 == l2 and all(m1[k] == m2[k] for k in m1)
    np.testing.assert_array_equal(g1, g2)
    assert np.all(np.asarray(g1)[~mask] == 0)


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_all_masked_row_is_excluded_from_denominators(mode):
    logp, old, _, adv, mask = _batch()
    keep = mask.any(1)
    assert not keep.all()  # the fixture has an all-padding row
    cfg = rl.loss_config("grpo", aggregation=mode)
    full, _ = rl.grpo_loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask), cfg)
    sub, _ = rl.grpo_loss(jnp.asarray(logp[keep]), jnp.asarray(old[keep]), None, jnp.asarray(adv[keep]),
                          jnp.asarray(mask[keep]), cfg)
    np.testing.assert_allclose(full, sub, rtol=1e-6)


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
@pytest.mark.parametrize("name", ["dapo", "gspo"])
def test_micro_batches_with_global_normaliser_give_the_whole_batch_gradient(name, mode):
    logp, old, _, adv, mask = _batch()
    cfg = rl.loss_config(name, aggregation=mode, eps_low=0.05, eps_high=0.05)
    fn = rl.get_loss(name)
    num_tokens, num_seqs = mask.sum(), mask.any(1).sum()

    def loss(lp, rows, **kw):
        return fn(lp, jnp.asarray(old[rows]), None, jnp.asarray(adv[rows]), jnp.asarray(mask[rows]), cfg, **kw)[0]

    whole, g_whole = jax.value_and_grad(loss)(jnp.asarray(logp), slice(None))
    parts = [jax.value_and_grad(loss)(jnp.asarray(logp[r]), r, num_tokens=num_tokens, num_seqs=num_seqs)
             for r in (slice(0, 2), slice(2, None))]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], whole, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([parts[0][1], parts[1][1]]), g_whole, rtol=1e-5, atol=1e-8)
    # without the global count, token-mean micro-batches are NOT the whole batch (the bug this guards against)
    if mode == "token-mean":
        naive = sum(loss(jnp.asarray(logp[r]), r) for r in (slice(0, 2), slice(2, None))) / 2
        assert abs(float(naive) - float(whole)) > 1e-3


def test_losses_jit_with_config_static():
    logp, old, _, adv, mask = _batch()
    cfg = rl.loss_config("dapo")
    f = jax.jit(partial(rl.dapo_loss, config=cfg, ref_logprobs_XT=None))
    loss, _ = f(jnp.asarray(logp), jnp.asarray(old), advantages_X=jnp.asarray(adv), mask_XT=jnp.asarray(mask))
    np.testing.assert_allclose(loss, _token_loss_np(logp, old, None, adv, mask, cfg, False)[0], rtol=1e-5)


@pytest.mark.parametrize("est", rl.KL_ESTIMATORS)
def test_kl_estimators_match_numpy(est):
    rng = np.random.default_rng(1)
    lp, rf = -rng.uniform(0.1, 3, (3, 5)), -rng.uniform(0.1, 3, (3, 5))
    r = np.exp(rf - lp)
    want = {"k1": lp - rf, "k2": 0.5 * (np.log(r)) ** 2, "k3": r - np.log(r) - 1}[est]
    np.testing.assert_allclose(rl.kl_divergence(jnp.asarray(lp), jnp.asarray(rf), est), want, rtol=1e-5, atol=1e-6)
    if est != "k1":
        assert np.all(np.asarray(rl.kl_divergence(jnp.asarray(lp), jnp.asarray(rf), est)) >= 0)


def test_bad_loss_inputs_raise_clearly():
    logp, old, _, adv, mask = _batch()
    with pytest.raises(ValueError, match="β=0.04"):
        rl.grpo_loss(logp, old, None, adv, mask, rl.loss_config("grpo", beta=0.04))
    with pytest.raises(ValueError) as e:
        rl.get_loss("ppo")
    assert "'ppo'" in str(e.value) and all(n in str(e.value) for n in rl.available_losses())
    with pytest.raises(ValueError, match="token-sum"):
        rl.loss_config("grpo", aggregation="token-sum")
    with pytest.raises(ValueError, match="k4"):
        rl.loss_config("grpo", kl_estimator="k4")
    with pytest.raises(ValueError, match="c=0.5"):
        rl.loss_config("gppo", dual_clip_c=0.5)


# ------------------------------------------------------------------------------------------------ advantages

def _advantages_np(r_BR, scale, eps=1e-6):
    out = np.zeros_like(r_BR)
    for b, row in enumerate(r_BR):
        ok = ~np.isnan(row)
        v = row[ok]
        if len(v) == 1:
            out[b, ok] = v  # verl's singleton rule: mean 0, std 1
        elif len(v) > 1 and v.max() > v.min():
            out[b, ok] = (v - v.mean()) / (v.std(ddof=1) + eps) if scale else v - v.mean()
    return out


def _rewards():
    rng = np.random.default_rng(2)
    r = rng.uniform(0, 1, (6, 4)).astype(np.float32)
    r[1] = 0.029899497                          # zero variance; its f32 mean over 3 has a rounding residue
    r[2, 3] = r[1, 3] = np.nan                  # unscorable
    r[3, [0, 1, 3]] = np.nan                    # one scorable sample left: the singleton rule
    r[4] = (rng.uniform(size=4) > 0.5)          # binary correctness
    return r


@pytest.mark.parametrize("name,scale", [("group_normalized", True), ("group_centered", False)])
def test_advantages_match_numpy(name, scale):
    r_BR = _rewards()
    fn = rl.get_advantage(name)
    adv_BR, m = fn(jnp.asarray(r_BR))
    want = _advantages_np(r_BR.astype(np.float64), scale)
    np.testing.assert_allclose(adv_BR, want, rtol=1e-5, atol=1e-6)
    adv_X, _ = fn(jnp.asarray(r_BR.reshape(-1)), 4)
    assert adv_X.shape == (24,)
    np.testing.assert_array_equal(adv_X, np.asarray(adv_BR).reshape(-1))
    assert np.all(np.asarray(adv_BR)[1] == 0.0)  # zero-variance group: exactly 0
    assert np.all(np.isfinite(np.asarray(adv_BR)))
    assert m["unscorable"] == 5
    np.testing.assert_allclose(m["frac_reward_zero_std"], 1 / 6)
    np.testing.assert_allclose(m["reward_mean"], np.nanmean(r_BR), rtol=1e-6)


def test_valid_mask_excludes_padded_groups_and_samples():
    r_BR = _rewards()
    valid = np.ones(r_BR.shape, bool)
    valid[5] = False       # a padded group
    valid[0, 0] = False    # a padded sample
    adv, m = rl.group_normalized_advantages(jnp.asarray(r_BR), valid=jnp.asarray(valid))
    r = r_BR.astype(np.float64).copy()
    r[~valid] = np.nan
    np.testing.assert_allclose(adv, _advantages_np(r, True), rtol=1e-5, atol=1e-6)
    assert m["unscorable"] == 5  # padding is not "unscorable"
    np.testing.assert_allclose(m["reward_mean"], np.nanmean(r), rtol=1e-6)


def test_bad_advantage_inputs_raise_with_the_values():
    with pytest.raises(ValueError, match="G=1"):
        rl.group_normalized_advantages(jnp.ones(8), 1)
    with pytest.raises(ValueError, match="G=1"):
        rl.group_normalized_advantages(jnp.ones((8, 1)))
    with pytest.raises(ValueError, match=r"10 .*G=4"):
        rl.group_normalized_advantages(jnp.ones(10), 4)
    with pytest.raises(ValueError, match="G=None|group_size=None"):
        rl.group_centered_advantages(jnp.ones(8))
    with pytest.raises(ValueError, match="G=3"):
        rl.group_centered_advantages(jnp.ones((2, 4)), 3)
    with pytest.raises(ValueError) as e:
        rl.get_advantage("no_such_estimator")
    assert all(n in str(e.value) for n in rl.available_advantages())


def _treepo_np(r_BR, ids_BRd, whiten=True, eps=1e-6):
    """TreePO leaf by leaf: mean over depths of (r_i − mean of its subgroup), deeper subgroups only if > 1 member."""
    B, R = r_BR.shape
    adv, keep = np.zeros((B, R)), np.zeros((B, R), bool)
    for b in range(B):
        ok = ~np.isnan(r_BR[b])
        if ok.sum() == 0 or np.nanmax(r_BR[b]) == np.nanmin(r_BR[b]):
            continue
        for i in np.flatnonzero(ok):
            terms = [r_BR[b, i] - r_BR[b, ok].mean()]
            for d in range(ids_BRd.shape[2]):
                members = [j for j in range(R) if ok[j] and ids_BRd[b, j, d] == ids_BRd[b, i, d]]
                if len(members) > 1:
                    terms.append(r_BR[b, i] - np.mean([r_BR[b, j] for j in members]))
            adv[b, i], keep[b, i] = np.mean(terms), True
    if whiten:
        v = adv[keep]
        adv[keep] = (v - v.mean()) / (v.std(ddof=1) + eps)
    return adv


def test_treepo_advantages_match_numpy():
    rng = np.random.default_rng(3)
    r_BR = rng.uniform(0, 1, (4, 6)).astype(np.float32)
    r_BR[1] = 0.5              # zero variance: stays 0 after whitening
    r_BR[2, 5] = np.nan        # unscorable
    # depth 1: two or three branches; depth 2: finer splits (some singletons, which are skipped)
    ids_BRd = np.stack([rng.integers(0, 3, (4, 6)), rng.integers(0, 5, (4, 6))], axis=-1)
    for whiten in (False, True):
        cfg = rl.advantage_config("treepo", whiten=whiten)
        adv, m = rl.get_advantage("treepo")(jnp.asarray(r_BR), config=cfg, subgroup_ids=jnp.asarray(ids_BRd))
        np.testing.assert_allclose(adv, _treepo_np(r_BR.astype(np.float64), ids_BRd, whiten), rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(adv)[1] == 0) and np.asarray(adv)[2, 5] == 0 and m["unscorable"] == 1
    flat, _ = rl.treepo_advantages(jnp.asarray(r_BR.reshape(-1)), 6, subgroup_ids=jnp.asarray(ids_BRd.reshape(24, 2)))
    np.testing.assert_array_equal(flat, np.asarray(adv).reshape(-1))
    # a tree whose depth-1 subgroups are all singletons is plain group-centring (before whitening)
    cfg = rl.advantage_config("treepo", whiten=False)
    singletons_BRd = np.broadcast_to(np.arange(6)[None, :, None], (4, 6, 1))
    adv, _ = rl.treepo_advantages(jnp.asarray(r_BR), config=cfg, subgroup_ids=jnp.asarray(singletons_BRd))
    np.testing.assert_allclose(adv, _advantages_np(r_BR.astype(np.float64), scale=False), rtol=1e-5, atol=1e-6)


def _lead_np(c, e, w, alpha=1.0, ema=0.95, lam=0.3, eps=1e-6):
    """LEAD step in NumPy: PSI weights, EMA, floor, two-stream combination, whitening (see LEADConfig)."""
    ok = ~(np.isnan(c) | np.isnan(e))
    a_c = _advantages_np(np.where(ok, c, np.nan), scale=True)
    a_e = _advantages_np(np.where(ok, e, np.nan), scale=True)
    correct = ok & (np.nan_to_num(c) >= 1.0)
    mu_c, sd_c = c[ok].mean(), c[ok].std()
    mu_e, sd_e = (e[correct].mean(), e[correct].std()) if correct.any() else (0.0, 0.0)
    cv_c, cv_e = sd_c / (abs(mu_c) + eps), sd_e / (abs(mu_e) + eps)
    phi_c = (1 - np.clip(mu_c, 0, 1)) ** alpha
    phi_e = (1 - (np.clip(mu_e, -1, 1) + 1) / 2) ** alpha
    d_c, d_e = cv_c / (cv_c + cv_e) * phi_c, cv_e / (cv_c + cv_e) * phi_e
    target = d_c / (d_c + d_e) if d_c + d_e > 0 else w
    w = ema * w + (1 - ema) * target
    w_c = max(w, lam)
    a = w_c * a_c + (1 - w_c) * a_e
    keep = ok & ((a_c != 0) | (a_e != 0))
    out = np.zeros_like(a)
    out[keep] = (a[keep] - a[keep].mean()) / (a[keep].std(ddof=1) + eps)
    return out, w


def test_lead_advantages_match_numpy_over_steps():
    rng = np.random.default_rng(4)
    state, w_np = rl.lead_init_state(), 0.5
    for step in range(4):
        c = (rng.uniform(size=(5, 4)) < 0.3 + 0.15 * step).astype(np.float32)  # accuracy rises: w_c moves
        e = rng.uniform(-1, 1, (5, 4)).astype(np.float32)
        c[0] = 1.0
        e[0] = 0.25          # row 0: constant on both streams → advantage 0
        e[2, 1] = np.nan     # unscorable
        adv, state, m = rl.lead_advantages(jnp.asarray(c), jnp.asarray(e), state=state)
        want, w_np = _lead_np(c.astype(np.float64), e.astype(np.float64), w_np)
        np.testing.assert_allclose(adv, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state["w_c"], w_np, rtol=1e-5)
        assert np.all(np.asarray(adv)[0] == 0) and np.asarray(adv)[2, 1] == 0 and m["unscorable"] == 1
        assert m["lead_w_c"] >= 0.3
    assert abs(float(state["w_c"]) - 0.5) > 1e-3  # the EMA moved
    # the λ_min floor: an EMA state far below it still weights correctness by λ_min
    _, _, m = rl.lead_advantages(jnp.asarray(c), jnp.asarray(e), state={"w_c": jnp.float32(0.0)})
    np.testing.assert_allclose(m["lead_w_c"], 0.3)


@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_ratio_weighted_k3_has_the_exact_reverse_kl_gradient(name):
    """Rows sampled from π_old in exact proportion (1/2, 1/3, 1/6 of 6 rows) make the token-mean an exact
    expectation E_old[·]. With ρ-weighting, ∇E_old[ρ·k3] = ∇KL(π_θ ‖ π_ref) at θ = θ_old; plain k3's is not."""
    p_old = np.array([1 / 2, 1 / 3, 1 / 6])
    theta = jnp.log(jnp.asarray(p_old, jnp.float32))
    log_ref = jnp.log(jnp.asarray([0.2, 0.5, 0.3], jnp.float32))
    tokens = np.array([0, 0, 0, 1, 1, 2])
    mask, adv = jnp.ones((6, 1)), jnp.zeros(6)  # A = 0: only the KL term has a gradient
    old = jax.nn.log_softmax(theta)[tokens][:, None]

    def loss(theta, weighted):
        cfg = rl.loss_config(name, beta=1.0, aggregation="token-mean", kl_ratio_weighted=weighted)
        logp = jax.nn.log_softmax(theta)[tokens][:, None]
        return rl.get_loss(name)(logp, old, log_ref[tokens][:, None], adv, mask, cfg)[0]

    exact = jax.grad(lambda t: jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - log_ref)))(theta)
    np.testing.assert_allclose(jax.grad(loss)(theta, True), exact, atol=1e-6)
    assert np.abs(np.asarray(jax.grad(loss)(theta, False) - exact)).max() > 1e-2  # the bias the weighting removes
    np.testing.assert_allclose(loss(theta, True), loss(theta, False), rtol=1e-6)  # same value on-policy (ρ = 1)
