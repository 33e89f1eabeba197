"""Early-exit decoding: a threshold that never fires is full-depth greedy; one that always fires at the first exit
equals a teacher-forced reference in which every generated position's deeper layers see the exited hidden state
(CALM's propagation: what later tokens attend to); the skipped layers' matmuls sit in a branch that only runs
when some row stays (checked in the traced program and in the compiled HLO), FLOP stats count what ran;
self-speculation with an exit as the draft is exact; bad input fails naming the value. On a hybrid (SSM +
attention) model with a DYNAMAX classifier: never firing is greedy, an exited token's propagated SSM state and KV
are what a later full-depth token reads, mixed depths keep each row exact, and the all-exited branch runs only
the skipped layers' state fills (compiled HLO)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.decoding import SelfDraft, generate, speculative_generate
from lmx.decoding.early_exit import EarlyExit, early_exit_generate
from lmx.decoding.generate import prefill
from lmx.models import build, decode_params, embed, head, init_params, init_state, make_ctx, preset, run_layers
from lmx.models.early_exit import ExitConfig
from tests.tiny import HYBRID_2X2

PROMPTS = [[5, 9, 17], [42], [3, 1, 4, 1, 5]]
T = 8


@pytest.fixture(scope="module")
def model():
    cfg = preset("llama-tiny", num_layers=4, exits=ExitConfig(layers=(1, 2), per_exit_norm=True, gates=True))
    m = build(cfg)
    params = init_params(m, jax.random.key(0))
    params["exit_norm_0"]["scale"] = params["exit_norm_0"]["scale"] * 1.3
    return m, params, jax.device_get(generate(m, params, PROMPTS, max_new_tokens=T))


@pytest.mark.parametrize("measure, threshold", [("softmax", 1.0), ("state", 1.0), ("gate", 1.0)])
def test_a_threshold_that_never_fires_is_full_depth_greedy(model, measure, threshold):
    m, params, g = model
    e = jax.device_get(early_exit_generate(m, params, PROMPTS, max_new_tokens=T, measure=measure,
                                           threshold=threshold))
    np.testing.assert_array_equal(e.tokens_BRT, g.tokens_BRT)
    np.testing.assert_allclose(e.logprobs_BRT, g.logprobs_BRT, atol=1e-5)
    s = e.stats
    assert float(s["layers_per_token"]) == 4 == float(s["executed_layers_per_call"])
    assert float(s["early_exit_fraction"]) == 0 and float(s["flops_saved"]) < 0  # the exit heads cost something


def _propagated_reference(m, params, prompt, tokens, e):
    """Logits after prompt + tokens[:t] for t = 0..len-1, teacher-forced, layer by layer: prompt positions run
    the full depth; at generated positions layers >= e take the exited hidden state (layer e's input) and the
    logits are exit 0's."""
    seq = jnp.asarray([prompt + tokens], jnp.int32)
    gen = jnp.asarray(np.arange(seq.shape[1]) >= len(prompt))[None, :, None]

    @jax.jit
    def forward(params, seq):
        dp = decode_params(m, params)
        x = embed(m, dp, seq)
        ctx = make_ctx(jnp.zeros(1, jnp.int32), seq.shape[1])
        for l in range(m.cfg.num_layers):
            if l == e:
                pin = x
            x, _ = run_layers(m, dp, jnp.where(gen & (l >= e), pin, x) if l >= e else x, None, ctx, l, l + 1)
        return head(m, dp, x)[0][0], head(m, dp, pin, norm="exit_norm_0")[0][0]

    full, exit0 = forward(params, seq)
    n = len(prompt)
    return np.concatenate([full[n - 1: n], exit0[n: n + len(tokens) - 1]])


def test_always_exiting_equals_the_truncated_model_with_propagated_state(model):
    m, params, _ = model
    e = jax.device_get(early_exit_generate(m, params, PROMPTS, max_new_tokens=T, measure="softmax", threshold=0.0))
    for b, prompt in enumerate(PROMPTS):
        toks = e.tokens_BRT[b, 0].tolist()
        logits = _propagated_reference(m, params, prompt, toks, e=1)
        np.testing.assert_array_equal(np.argmax(logits, -1), toks)  # greedy: each token is the reference's argmax
        np.testing.assert_allclose(e.logprobs_BRT[b, 0], jax.nn.log_softmax(logits)[np.arange(T), toks], atol=1e-4)
    s = e.stats
    assert float(s["layers_per_token"]) == 1 == float(s["executed_layers_per_call"])
    assert float(s["early_exit_fraction"]) == 1


@pytest.mark.parametrize("measure, threshold", [("softmax", 0.05), ("gate", 0.5)])
def test_rows_exiting_at_different_depths_produce_what_each_would_alone(model, measure, threshold):
    """In a batch some rows exit while others run on: the exited rows are pinned, so their KV (what their later
    tokens attend to) is the propagated state's, as at batch 1, where a lone exit skips the rest (the cond)."""
    m, params, _ = model
    e = jax.device_get(early_exit_generate(m, params, PROMPTS * 2, max_new_tokens=T, measure=measure,
                                           threshold=threshold))
    assert 0.3 < float(e.stats["early_exit_fraction"]) < 0.8  # mixed depths in the batch
    for b, prompt in enumerate(PROMPTS):
        alone = jax.device_get(early_exit_generate(m, params, [prompt], max_new_tokens=T, measure=measure,
                                                   threshold=threshold))
        np.testing.assert_array_equal(e.tokens_BRT[b], alone.tokens_BRT[0])
        np.testing.assert_array_equal(e.tokens_BRT[b + len(PROMPTS)], alone.tokens_BRT[0])
        np.testing.assert_allclose(e.logprobs_BRT[b], alone.logprobs_BRT[0], atol=1e-5)


def _dots(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        if eqn.primitive.name != "cond":
            n += sum(_dots(v.jaxpr) for v in eqn.params.values() if hasattr(v, "jaxpr"))
    return n


def test_skipped_layers_do_not_run_and_flops_count_what_ran(model):
    """One decode call on a 4-layer model exiting after layer 1: outside any cond the program holds layer 0's 9
    matmuls (q, k, v, o, q·k, p·v, gate, up, down) and exit 0's head; the cond taken when every row exits holds
    only the K/V projections of layers 1..3 (2 each), the other branch the rest of the network. The compiled
    program keeps the conditional (XLA does not turn it into a select that would run both)."""
    m, params, _ = model
    m2 = build(preset("llama-tiny", num_layers=4, exits=ExitConfig(layers=(1,))))
    p2 = init_params(m2, jax.random.key(0))
    step = EarlyExit("softmax", 0.5)

    def one(dp, tok_X, state):
        return step(m2, dp, tok_X, state, step.init(m2.cfg, 2), jnp.ones(2, bool))

    args = (decode_params(m2, p2), jnp.array([1, 2]), init_state(m2.cfg, 2, 16))
    jaxpr = jax.make_jaxpr(one)(*args).jaxpr
    conds = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
    assert _dots(jaxpr) == 9 + 1 and len(conds) == 1
    fill, rest = (b.jaxpr for b in conds[0].params["branches"])  # lax.cond: branches[1] runs when all exited
    assert sorted([_dots(fill), _dots(rest)]) == [2 * 3, 9 * 3 + 1]
    assert "conditional(" in jax.jit(one).lower(*args).compile().as_text()

    e = jax.device_get(early_exit_generate(m, params, PROMPTS, max_new_tokens=T, measure="softmax", threshold=0.0))
    g = model[2]
    assert 0 < float(e.stats["flops"]) < 0.6 * float(g.stats["flops"])
    np.testing.assert_allclose(e.stats["flops_saved"], g.stats["flops"] - e.stats["flops"], rtol=1e-6)


def test_self_speculation_with_an_exit_draft_is_exact(model):
    m, params, g = model
    m1 = build(preset("llama-tiny", num_layers=4, exits=ExitConfig(layers=(1, 2))))  # the shared final norm
    p1 = init_params(m1, jax.random.key(0))
    want = jax.device_get(generate(m1, p1, PROMPTS, max_new_tokens=T))
    s = jax.device_get(speculative_generate(m1, p1, PROMPTS, draft=SelfDraft(2), gamma=3, max_new_tokens=T))
    np.testing.assert_array_equal(s.tokens_BRT, want.tokens_BRT)


@pytest.mark.parametrize("kw, match", [
    (dict(measure="entropy"), "measure='entropy'"), (dict(threshold=1.5), r"threshold=1.5 is outside \[0, 1\]"),
    (dict(measure="state", threshold=-2.0), r"threshold=-2.0 is outside \[-1, 1\]"),
    (dict(threshold=float("nan")), "threshold=nan")])
def test_bad_early_exit_input_fails_naming_the_value(model, kw, match):
    m, params, _ = model
    with pytest.raises(ValueError, match=match):
        early_exit_generate(m, params, PROMPTS, max_new_tokens=T, **kw)


def test_early_exit_needs_exits_gates_and_classifiers(model):
    # The stepper is checked before the params are touched (None here), so nothing compiles.
    with pytest.raises(ValueError, match="needs a model with exits"):
        early_exit_generate(build(preset("llama-tiny", num_layers=2)), None, PROMPTS, max_new_tokens=T)
    m = build(preset("llama-tiny", num_layers=2, exits=ExitConfig(layers=(1,))))
    with pytest.raises(ValueError, match="measure='gate' needs exit gates"):
        early_exit_generate(m, None, PROMPTS, max_new_tokens=T, measure="gate")
    with pytest.raises(ValueError, match="measure='classifier' needs exit classifiers"):
        early_exit_generate(m, None, PROMPTS, max_new_tokens=T, measure="classifier")


# ------------------------------------------------------------------- SSM layers and DYNAMAX exit classifiers


@pytest.fixture(scope="module")
def hybrid(tiny):
    """(ssm, attn) x 2 with an exit after the first unit and a DYNAMAX classifier: the exit skips an SSM and an
    attention layer. Batches of 3 rows; a batch of one prompt three times is that prompt alone (identical rows
    exit together, so the all-exited branch runs as at batch 1) in the same program."""
    return tiny("hybrid-tiny", **HYBRID_2X2, exits=ExitConfig(layers=(2,), classifier="mamba"))


def _padded(prompts, continuations):
    """Prompts + continuations, right-padded to one width (one compiled reference for every check)."""
    seq_BS = np.zeros((len(prompts), max(map(len, PROMPTS)) + T), np.int32)
    for b, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        seq_BS[b, :len(prompt) + len(cont)] = prompt + list(cont)
    return seq_BS, np.array([len(p) for p in prompts])


@functools.partial(jax.jit, static_argnums=0)
def _pinned_reference(m, params, seq_BS, pinned_BS):
    """Teacher-forced, layer by layer (causal: right padding changes no earlier position). At the pinned positions
    layers >= 2 take layer 2's input, the exited state, as CALM's propagation fills them: (final logits, exit 0's
    logits)."""
    dp = decode_params(m, params)
    x = embed(m, dp, seq_BS)
    ctx = make_ctx(jnp.zeros(seq_BS.shape[0], jnp.int32), seq_BS.shape[1])
    pin = x
    for l in range(m.cfg.num_layers):
        pin = x if l == 2 else pin
        x, _ = run_layers(m, dp, jnp.where(pinned_BS[..., None] & (l >= 2), pin, x), None, ctx, l, l + 1)
    return head(m, dp, x)[0], head(m, dp, pin)[0]


def test_ssm_model_with_a_classifier_that_never_fires_is_greedy(hybrid):
    """Each token is the full model's teacher-forced argmax (greedy), with its log-prob."""
    m, params = hybrid
    e = jax.device_get(early_exit_generate(m, params, PROMPTS, max_new_tokens=T, measure="classifier",
                                           threshold=1.0))
    seq_BS, n_B = _padded(PROMPTS, e.tokens_BRT[:, 0])
    logp_BSV = jax.nn.log_softmax(_pinned_reference(m, params, seq_BS, np.zeros(seq_BS.shape, bool))[0])
    for b, n in enumerate(n_B):
        at = np.arange(n - 1, n + T - 1)
        np.testing.assert_array_equal(e.tokens_BRT[b, 0], np.argmax(logp_BSV[b, at], -1))
        np.testing.assert_allclose(e.logprobs_BRT[b, 0], logp_BSV[b, at, seq_BS[b, at + 1]], atol=1e-4)
    assert float(e.stats["layers_per_token"]) == 4 and float(e.stats["overflow"]) == 0


def test_ssm_model_exiting_tokens_leave_the_propagated_state(hybrid):
    """A token exits after layer 2 (a threshold that always fires), then the next runs the full depth (one that
    never does), fed step by step. The exit's logits are the truncated model's, and the next token reads what it
    left: the skipped SSM layer's state advanced on the exited hidden state (as the skipped attention layer's KV
    was filled from it), so its logits are those of the teacher-forced reference whose layers >= 2 take the
    exited state at the exited position."""
    m, params = hybrid
    seq_BS, n_B = _padded(PROMPTS, [[7, 8]] * 3)

    @jax.jit
    def exit_then_full(params, prompt_BT, n_B, tok_BK):
        dp = decode_params(m, params)
        _, state = prefill(m, dp, prompt_BT, n_B, init_state(m.cfg, 3, 16, rollback_window=0))
        logits = []
        for k, step in enumerate((EarlyExit("softmax", 0.0), EarlyExit("softmax", 1.0))):
            logits_XV, state, _ = step(m, dp, tok_BK[:, k], state, step.init(m.cfg, 3), jnp.ones(3, bool))
            logits.append(logits_XV)
        return logits

    rows = np.arange(3)
    exited, after = exit_then_full(params, seq_BS[:, :max(n_B)], n_B, seq_BS[rows[:, None], n_B[:, None] + [0, 1]])
    full, exit0 = _pinned_reference(m, params, seq_BS, np.arange(seq_BS.shape[1])[None] == n_B[:, None])
    np.testing.assert_allclose(exited, exit0[rows, n_B], atol=1e-4)
    np.testing.assert_allclose(after, full[rows, n_B + 1], atol=1e-4)
    assert np.abs(np.asarray(full[rows, n_B + 1]) - np.asarray(exit0[rows, n_B + 1])).max() > 0.1


def test_ssm_rows_exiting_by_their_classifier_produce_what_each_would_alone(hybrid):
    """Mixed depths in a batch: exited rows are pinned through the SSM layers and their classifier states advance
    on the exited state, so every row's tokens are those it produces alone."""
    m, params = hybrid
    run = lambda prompts: jax.device_get(early_exit_generate(  # noqa: E731
        m, params, prompts, max_new_tokens=T, measure="classifier", threshold=0.5))
    e = run(PROMPTS)
    assert 0.1 < float(e.stats["early_exit_fraction"]) < 0.9
    for b, prompt in enumerate(PROMPTS):
        alone = run([prompt] * 3)
        np.testing.assert_array_equal(e.tokens_BRT[b], alone.tokens_BRT[0])
        np.testing.assert_allclose(e.logprobs_BRT[b], alone.logprobs_BRT[0], atol=1e-5)


def _hlo_computations(text):
    comps, body = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            body = comps[m.group(1)] = []
        elif body is not None:
            body.append(line)
    return comps


def _hlo_dot_widths(comps, root):
    """The output widths of the dots computation `root` runs, following fusions and nested computations."""
    seen, todo, widths = set(), [root], []
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            if re.search(r"\sdot\(", line):
                widths.append(int(re.search(r"= f32\[([\d,]*)\]", line).group(1).split(",")[-1]))
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo += [n.strip().lstrip("%") for n in group.split(",")]
    return sorted(widths)


def test_skipped_ssm_layers_run_only_their_state_update(hybrid):
    """In the compiled decode call, the branch taken when every row has exited runs the SSM layer's in-projection
    (its state update; width I + Y + N = 328) and the attention layer's K and V projections (32 each): not the SSM
    layer's out-projection, nor the attention layer's q, o and MLP, which the other branch holds."""
    m, params = hybrid
    step = EarlyExit("softmax", 0.5)

    def one(dp, tok_X, state):
        return step(m, dp, tok_X, state, step.init(m.cfg, 2), jnp.ones(2, bool))

    text = jax.jit(one).lower(decode_params(m, params), jnp.array([1, 2]), init_state(m.cfg, 2, 16, rollback_window=0)
                              ).compile().as_text()
    comps = _hlo_computations(text)
    (rest, fill), = re.findall(r"conditional\(.*branch_computations=\{%?([\w.\-]+), %?([\w.\-]+)\}", text)
    assert _hlo_dot_widths(comps, fill) == [32, 32, 328]  # (the one exit's classifier runs before the branch)
    assert 64 in _hlo_dot_widths(comps, rest) and 192 in _hlo_dot_widths(comps, rest)  # out-projection, MLP
