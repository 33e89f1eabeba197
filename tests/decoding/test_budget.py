import functools
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.data.tokenizer import CharTokenizer
from lmx.decoding import Greedy, Sampler, generate
from lmx.decoding.budget import BudgetForcing, no_thinking_prompts
from lmx.train.rewards import count_between

TOK = CharTokenizer()
OPEN, CLOSE, ANSWER = TOK.think_id, TOK.end_think_id, TOK.answer_id
N = 4  # the cap
# Rows: ends in <think>; open block with 2 thinking tokens already; no block; a NoThinking prompt (closed block).
PROMPTS = [[9, 17, OPEN], [OPEN, 1, CLOSE, 1, OPEN, 9, 2], [42, 50, 60], *no_thinking_prompts([[20, 30]], TOK)]
PROMPT_THINKING = [0, 2, None, None]  # thinking tokens in the prompt's open block (None: not thinking)
NEW, R, SAMPLER = 12, 2, Sampler(temperature=0.8, top_k=20)
CAP = BudgetForcing(max_thinking=N, answer_prefix=(ANSWER, 40))  # a two-token answer prefix


def trace_count():
    return sys.modules["lmx.decoding.generate"]._trace_count


def run(tiny, forcing=None, key=0):
    model, params = tiny("llama-tiny")
    return generate(model, params, PROMPTS, max_new_tokens=NEW, sampler=SAMPLER, rng=jax.random.key(key),
                    num_samples=R, forcing=forcing)


@functools.cache
def free_run(tiny):
    return run(tiny)


def full_sequences(g):
    """[B·R] prompt + completion rows (true lengths only)."""
    n_BR = np.asarray(g.lengths_BR)
    return [np.concatenate([PROMPTS[b], np.asarray(g.tokens_BRT[b, r, : n_BR[b, r]])])
            for b in range(len(PROMPTS)) for r in range(R)]


def test_cap_forces_close_then_answer_prefix_exactly_at_the_budget(tiny):
    free, g = free_run(tiny), run(tiny, CAP)
    count = trace_count()
    again = run(tiny, BudgetForcing(max_thinking=N, answer_prefix=[ANSWER, 40]))  # equal policy: cache hit
    assert trace_count() == count
    jax.tree.map(np.testing.assert_array_equal, g, again)
    free_BRT, g_BRT, seqs = np.asarray(free.tokens_BRT), np.asarray(g.tokens_BRT), full_sequences(g)
    for b, prompt in enumerate(PROMPTS):
        for r in range(R):
            seq = seqs[b * R + r]
            if PROMPT_THINKING[b] is None:  # not inside a thinking block: untouched
                np.testing.assert_array_equal(g_BRT[b, r], free_BRT[b, r])
                assert count_between(g_BRT[b, r], g.lengths_BR[b, r]) == 0
                continue
            k = N - PROMPT_THINKING[b]  # completion position of the forced close
            assert CLOSE not in free_BRT[b, r, :k]  # precondition: the model does not close on its own first
            np.testing.assert_array_equal(g_BRT[b, r, :k], free_BRT[b, r, :k])  # same draws until forced
            np.testing.assert_array_equal(g_BRT[b, r, k: k + 3], [CLOSE, ANSWER, 40])
            open_pos = len(prompt) - 1 - PROMPT_THINKING[b]
            assert seq[open_pos] == OPEN and seq[open_pos + N + 1] == CLOSE
            assert count_between(seq[open_pos:], len(seq) - open_pos) == N  # the cap, prompt + completion
    assert (np.asarray(g.lengths_BR) == NEW).all()


def test_logprobs_are_the_models_for_drawn_and_forced_tokens(tiny):
    """Every recorded log-prob equals log softmax(logits / τ)[token] of a teacher-forced forward over prompt +
    completion: unchanged for drawn tokens, the model's own for forced ones."""
    model, params = tiny("llama-tiny")
    g = run(tiny, CAP)
    seqs = full_sequences(g)
    padded_XT = np.zeros((len(seqs), max(map(len, seqs))), np.int32)  # right padding: causal, ignored
    for x, seq in enumerate(seqs):
        padded_XT[x, : len(seq)] = seq
    logp_XTV = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, padded_XT).logits_BTV / 0.8))
    for x, seq in enumerate(seqs):
        b, r = divmod(x, R)
        P, n = len(PROMPTS[b]), int(g.lengths_BR[b, r])
        want = logp_XTV[x, np.arange(P - 1, P - 1 + n), seq[P:]]
        np.testing.assert_allclose(g.logprobs_BRT[b, r, :n], want, atol=1e-4)


@dataclass(frozen=True)
class NoOp:
    """The smallest Forcing policy: no state, the drawn token."""

    def check(self, vocab_size, max_new_tokens):
        pass

    def init(self, prompt_XT, prompt_lengths_X):
        return ()

    def __call__(self, state, record, logits_XV, draw):
        return state, draw(logits_XV)


def test_no_op_policy_is_bit_identical_to_no_policy(tiny):
    jax.tree.map(np.testing.assert_array_equal, run(tiny, NoOp()), free_run(tiny))


@pytest.mark.parametrize("forcing, want", [
    # The flat model always draws token 0, used as the close delimiter: every step it would end thinking.
    (BudgetForcing(think_close=0, answer_prefix=(), extend_times=2, continuation=(10, 11)),
     [10, 11, 10, 11, 0, 0, 0, 0]),  # suppressed exactly twice, then the model's own close
    (BudgetForcing(think_close=0, answer_prefix=(), min_thinking=5, continuation=(10, 11)),
     [10, 11, 10, 11, 10, 11, 0, 0]),  # extended while < 5 thinking tokens (a run completes)
    (BudgetForcing(max_thinking=3, think_close=0, extend_times=5, continuation=(10, 11)),
     [10, 11, 10, 0, ANSWER, 0, 0, 0]),  # the cap wins over a pending continuation
])
def test_extension_suppresses_close_and_appends_the_continuation(tiny, forcing, want):
    model, params = tiny("llama-tiny")
    flat = {**params, "final_norm": jax.tree.map(jnp.zeros_like, params["final_norm"])}  # every logit 0
    g = generate(model, flat, [[9, OPEN], [OPEN]], max_new_tokens=8, sampler=Greedy(), forcing=forcing, pad_id=1)
    assert g.tokens_BRT[:, 0].tolist() == [want, want]
    assert count_between(np.array([OPEN, *want]), 9, OPEN, 0) == want.index(0)  # thinking tokens before the close


def test_no_thinking_prompts_close_the_block_and_completions_do_not_think(tiny):
    filler = "Okay, I think I have finished thinking."
    f = TOK.encode(filler)
    assert no_thinking_prompts([[9, 17], [OPEN], [1, 2, OPEN, 30]], TOK, filler=filler) == [
        [9, 17, OPEN, *f, CLOSE], [OPEN, *f, CLOSE], [1, 2, OPEN, 30, OPEN, *f, CLOSE]]
    tokens_BT, lengths_B = np.array([[9, 17, 0], [7, 8, OPEN]]), np.array([2, 3])
    assert no_thinking_prompts((tokens_BT, lengths_B), TOK) == [[9, 17, OPEN, CLOSE], [7, 8, OPEN, CLOSE]]
    g = free_run(tiny)  # its last prompt is a NoThinking one
    assert (count_between(g.tokens_BRT[-1], g.lengths_BR[-1]) == 0).all()
    assert not np.isin(np.asarray(g.tokens_BRT[-1]), [OPEN, CLOSE]).any()


@pytest.mark.parametrize("kw, match", [
    (dict(max_thinking=-1), r"max_thinking=-1 must be an int >= 0"),
    (dict(min_thinking=-2, continuation=(9,)), r"min_thinking=-2 must be an int >= 0"),
    (dict(think_close="</think>"), r"think_close='</think>' must be a token id"),
    (dict(answer_prefix="<answer>"), r"answer_prefix='<answer>' must be a sequence of token ids"),
    (dict(continuation=(9, -3), extend_times=1), r"continuation\[1\]=-3 must be a token id"),
    (dict(think_open=4), r"think_open and think_close are both 4"),
    (dict(min_thinking=2, extend_times=1, continuation=(9,)), r"min_thinking=2 or extend_times=1, not both"),
    (dict(extend_times=1), r"needs continuation token"),
    (dict(max_thinking=2, min_thinking=3, continuation=(9,)), r"min_thinking=3 exceeds max_thinking=2"),
    (dict(extend_times=1, continuation=(9, CLOSE)), r"continuation=\(9, 4\) contains the thinking delimiter"),
])
def test_bad_policy_fails_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        BudgetForcing(**kw)


@pytest.mark.parametrize("forcing, kw, match", [
    (BudgetForcing(max_thinking=2, answer_prefix=(ANSWER, 200)), {},
     r"answer_prefix=\(5, 200\) has ids outside the vocabulary \(size 128\)"),
    (BudgetForcing(think_open=128), {}, r"think_open=128 has ids outside the vocabulary"),
    (BudgetForcing(max_thinking=0, answer_prefix=(ANSWER, 9)), dict(max_new_tokens=2),
     r"max_new_tokens=2 cannot hold the forced close delimiter and answer prefix \(3 tokens\)"),
    (object(), {}, r"forcing must be a Forcing policy"),
])
def test_bad_forcing_in_generate_fails_before_tracing(tiny, forcing, kw, match):
    model, params = tiny("llama-tiny")
    count = trace_count()
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, params, PROMPTS, **(dict(max_new_tokens=NEW, forcing=forcing) | kw))
    assert trace_count() == count


def test_no_thinking_filler_and_tokenizer_constructor():
    with pytest.raises(ValueError, match=r"filler='<think>' contains a thinking delimiter"):
        no_thinking_prompts([[1]], TOK, filler="<think>")
    f = BudgetForcing.from_tokenizer(TOK, 8, extend_times=1, answer_prefix="Answer:")
    assert f == BudgetForcing(8, OPEN, CLOSE, tuple(TOK.encode("Answer:")), 0, 1, tuple(TOK.encode("Wait")))
