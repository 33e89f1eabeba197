import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.data.tokenizer import CharTokenizer
from lmx.decoding import Greedy, SoftThinking, ThinkRouter, generate, latent_generate

TOK = CharTokenizer()
OPEN, CLOSE = TOK.think_id, TOK.end_think_id
# Equal lengths, so the no-cache reference runs all rows at once: two rows start thinking, one does not (and
# thinks only if it draws <think>).
PROMPTS = [[9, 17, OPEN], [42, 50, 60], [OPEN, 20, 21]]
NEW, STEPS = 6, 4  # tokens per row; steps the reference checks
SOFT = SoftThinking(temperature=0.7)


@functools.cache
def run(tiny, mode=None):
    """Greedy `generate` (mode None) or latent_generate: one compiled program per mode, shared by every test."""
    model, params = tiny("llama-tiny")
    kw = dict(max_new_tokens=NEW, sampler=Greedy())
    return jax.device_get(generate(model, params, PROMPTS, **kw) if mode is None
                          else latent_generate(model, params, PROMPTS, mode=mode, **kw))


def assert_same(a, b):
    np.testing.assert_array_equal(a.tokens_BRT, b.tokens_BRT)
    np.testing.assert_array_equal(a.lengths_BR, b.lengths_BR)
    np.testing.assert_allclose(a.logprobs_BRT, b.logprobs_BRT, atol=1e-6)


def test_soft_tokens_at_zero_temperature_are_greedy_decoding(tiny):
    greedy, soft = run(tiny), run(tiny, SoftThinking(temperature=1e-4))
    assert_same(soft, greedy)
    assert set(soft.stats) == set(greedy.stats) | {"soft_steps"}
    assert int(soft.stats["soft_steps"]) >= 2 * NEW - 2  # rows 0 and 2 think (a drawn </think> is fed as a token)
    for key in ("tokens_generated", "model_calls", "flops", "state_bytes_read", "bytes_moved"):
        np.testing.assert_allclose(soft.stats[key], greedy.stats[key])


def test_soft_decoder_matches_a_no_cache_reference(tiny):
    """The jitted soft decoder (cache, decode_step with embeddings) against model.apply on the whole growing
    sequence with embeds_BTD: the same tokens and log-probs (of the logits) for STEPS steps."""
    model, params = tiny("llama-tiny")
    g = run(tiny, SOFT)
    E_VD = params["embed"]["embedding"]
    # One fixed length, so one compilation: the model is causal, position t's logits ignore what follows.
    apply = jax.jit(lambda t, e, u: model.apply({"params": params}, t, embeds_BTD=e, use_embeds_BT=u).logits_BTV)
    P = len(PROMPTS[0])
    tokens_BT = jnp.zeros((3, P + STEPS), jnp.int32).at[:, :P].set(jnp.array(PROMPTS))
    embeds_BTD = jnp.zeros(tokens_BT.shape + (E_VD.shape[1],))
    use_BT = jnp.zeros(tokens_BT.shape, bool)
    phase_B = jnp.array([1, 0, 1])  # 0 before the thinking block, 1 inside, 2 after
    for t in range(STEPS):
        logits_BV = apply(tokens_BT, embeds_BTD, use_BT)[:, P + t - 1]
        tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        np.testing.assert_array_equal(g.tokens_BRT[:, 0, t], tok_B, err_msg=f"step {t}")
        np.testing.assert_allclose(g.logprobs_BRT[:, 0, t], jax.nn.log_softmax(logits_BV)[jnp.arange(3), tok_B],
                                   atol=2e-5, err_msg=f"step {t}")
        if t + 1 < STEPS:  # feed position P + t
            tokens_BT = tokens_BT.at[:, P + t].set(tok_B)
            embeds_BTD = embeds_BTD.at[:, P + t].set(jax.nn.softmax(logits_BV / SOFT.temperature) @ E_VD)
            use_BT = use_BT.at[:, P + t].set((phase_B == 1) & (tok_B != CLOSE))
            phase_B = jnp.where((phase_B == 0) & (tok_B == OPEN), 1,
                                jnp.where((phase_B == 1) & (tok_B == CLOSE), 2, phase_B))
    # Feeding soft embeddings changed the model's inputs (otherwise the reference proves nothing).
    assert not np.allclose(g.logprobs_BRT, run(tiny).logprobs_BRT, atol=1e-4)


def test_think_router_all_discrete_is_plain_decoding_and_all_soft_is_soft_thinking(tiny):
    # Greedy, whose program the first test compiled; soft steps at τ = 0.7 would differ from it (test above).
    discrete = run(tiny, ThinkRouter(temperature=0.7, threshold=1.5))  # p_max < 1.5 always
    assert_same(discrete, run(tiny))
    assert int(discrete.stats["soft_steps"]) == 0
    soft = run(tiny, ThinkRouter(temperature=0.7, threshold=0.0))  # p_max >= 0 always
    assert_same(soft, run(tiny, SOFT))
    assert int(soft.stats["soft_steps"]) == int(run(tiny, SOFT).stats["soft_steps"]) > 0


def test_teacher_forced_embeds_of_the_tokens_equal_the_token_call(tiny):
    model, params = tiny("llama-tiny")
    tokens_BT = jnp.array([[5, 9, 17, 40, 3], [7, 60, 61, 2, 8]], jnp.int32)
    use_BT = jnp.array([[True, False, True, True, False], [False, True, True, False, True]])
    embeds_BTD = params["embed"]["embedding"][tokens_BT]
    apply = lambda **kw: model.apply({"params": params}, tokens_BT, **kw).logits_BTV
    want, masked, everywhere = jax.jit(lambda e, u: (apply(), apply(embeds_BTD=e, use_embeds_BT=u),
                                                     apply(embeds_BTD=e)))(embeds_BTD, use_BT)  # one compilation
    np.testing.assert_array_equal(masked, want)  # bit-identical
    np.testing.assert_array_equal(everywhere, want)  # no mask: every position

def test_bad_inputs_raise_naming_the_value(tiny):
    model, params = tiny("llama-tiny")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            SoftThinking(temperature=bad)
    with pytest.raises(ValueError, match="threshold=-0.1"):
        ThinkRouter(threshold=-0.1)
    with pytest.raises(ValueError, match="think_close=500"):
        latent_generate(model, params, PROMPTS, max_new_tokens=2, mode=SoftThinking(think_close=500))
    with pytest.raises(ValueError, match="noise_std"):
        latent_generate(model, params, PROMPTS, max_new_tokens=2, mode=SoftThinking(noise_std=0.1))
    tokens_BT = jnp.zeros((2, 3), jnp.int32)
    embeds_BTD = jnp.zeros((2, 3, model.cfg.d_model))
    with pytest.raises(ValueError, match=r"use_embeds_BT has shape \(2, 4\)"):
        model.apply({"params": params}, tokens_BT, embeds_BTD=embeds_BTD, use_embeds_BT=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"embeds_BTD has shape \(2, 3, 8\)"):
        model.apply({"params": params}, tokens_BT, embeds_BTD=jnp.zeros((2, 3, 8)))
