import math

import jax
import numpy as np
import pytest

from lmx.data.tasks import Arithmetic, Problem
from lmx.data.tasks.base import TaskBase
from lmx.data.tokenizer import CharTokenizer
from lmx.decoding import (
    Generation,
    Sampler,
    best_of_majority,
    best_of_n,
    first_finish,
    fit_weibull_mixture,
    majority_vote,
    rpc,
    run_method,
    short_m_at_k,
    verifier_scorer,
    weighted_majority,
)
from lmx.decoding.scaling import rpc_pruned

TOK, TASK = CharTokenizer(), TaskBase()  # TaskBase: the shared <answer>...</answer> extraction


def ids(answer, n=None, finished=True, think=""):
    """Token ids of '<think>{think}</think><answer>{answer}</answer>' (+ eos if finished), the think span padded
    with '.' to n tokens in all; answer None: no answer tags."""
    body = "" if answer is None else f"<answer>{answer}</answer>"
    out = TOK.encode(f"<think>{think}</think>{body}", add_eos=finished)
    if n is not None:
        assert n >= len(out), (n, len(out))
        out = out[:1] + TOK.encode("." * (n - len(out))) + out[1:]
    return out


def make_gen(rows, mean_logprobs=None, finished=None):
    """A Generation of B x R samples from rows[b][r] = (answer, n) or token ids; each token's log-prob is the
    sample's mean_logprob (default -1)."""
    rows = [[s if isinstance(s, list) else ids(*s) for s in row] for row in rows]
    B, R, T = len(rows), len(rows[0]), max(len(s) for row in rows for s in row)
    tokens = np.zeros((B, R, T), np.int32)
    logprobs = np.zeros((B, R, T), np.float32)
    lengths = np.array([[len(s) for s in row] for row in rows], np.int32)
    mean = np.full((B, R), -1.0) if mean_logprobs is None else np.asarray(mean_logprobs, np.float64)
    for (b, r), n in np.ndenumerate(lengths):
        tokens[b, r, :n] = rows[b][r]
        logprobs[b, r, :n] = mean[b, r]
    if finished is None:
        finished = tokens[np.arange(B)[:, None], np.arange(R), lengths - 1] == TOK.eos_id
    stats = {"tokens_generated": lengths.sum(), "model_calls": np.int32(T), "decode_steps": np.int32(T - 1),
             "flops": np.float32(1e6)}
    return Generation(tokens, lengths, logprobs, np.asarray(finished, bool), stats)


def test_majority_vote_ties_to_the_first_occurrence_and_skips_unanswerable():
    gen = make_gen([[("3",), ("5",), ("5",), (None,), ("3",)],
                    [(None,), (None,), ("7",), (None,), (None,)],  # None is most common but never wins
                    [(None,)] * 5])
    res = majority_vote(gen, TOK, TASK)
    assert res.answers == ["3", "7", None]  # 3 and 5 tie at two votes; 3 occurs first
    assert res.chosen_B.tolist() == [0, 2, -1]
    assert res.tokens_generated == int(gen.lengths_BR.sum()) and res.model_calls == gen.stats["model_calls"]
    assert res.flops == 1e6 and res.tokens_B.tolist() == gen.lengths_BR.sum(-1).tolist()
    assert res.answers_BR[0] == ["3", "5", "5", None, "3"]


def test_weighted_majority():
    rows = [[("1",), ("2",), ("2",), ("1",)]]
    gen = make_gen(rows)
    assert weighted_majority(gen, TOK, TASK, np.array([[0.5, 0.3, 0.2, 0.1]])).answers == ["1"]  # 0.6 vs 0.5
    tie = weighted_majority(gen, TOK, TASK, np.array([[0.25, 0.5, 0.25, 0.5]]))  # 0.75 each: first occurrence
    assert (tie.answers, tie.chosen_B.tolist()) == (["1"], [0])
    nan = weighted_majority(gen, TOK, TASK, np.array([[np.nan, 1.0, 0.0, 0.5]]))  # NaN (unscorable) counts 0
    assert (nan.answers, nan.chosen_B.tolist()) == (["2"], [1])
    # Default weights: p_i = exp(mean log-prob): 1 gets 0.9 + 0.1, 2 gets 0.2 + 0.3 (a plain count ties).
    probs = make_gen(rows, mean_logprobs=np.log([[0.9, 0.2, 0.3, 0.1]]))
    res = weighted_majority(probs, TOK, TASK)
    assert res.answers == ["1"]
    np.testing.assert_allclose(res.scores_BR, [[0.9, 0.2, 0.3, 0.1]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"weights >= 0.*-0.5"):
        weighted_majority(gen, TOK, TASK, np.array([[1.0, -0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"weights gave shape \(1, 3\), expected \[B, R\] = \(1, 4\)"):
        weighted_majority(gen, TOK, TASK, lambda g, c: np.zeros((1, 3)))


def test_best_of_n():
    gen = make_gen([[("1",), ("2",), ("3",), (None,)]], mean_logprobs=[[-1.0, -0.5, -0.5, -0.1]])
    # mean_logprob: the unanswerable sample scores highest but never wins; 1 and 2 tie -> the lower index.
    res = best_of_n(gen, TOK, TASK)
    assert (res.answers, res.chosen_B.tolist()) == (["2"], [1])
    assert best_of_n(gen, TOK, TASK, np.array([[0.2, np.nan, 0.9, 1.0]])).answers == ["3"]
    assert best_of_n(gen, TOK, TASK, np.array([[np.nan] * 4])).chosen_B.tolist() == [0]  # all NaN: lowest index
    # A verifier as the scorer: the task's own score against the problem (answer 3).
    problems = [Problem(prompt="1+2=", answer="3")]
    assert best_of_n(gen, TOK, Arithmetic(), verifier_scorer(Arithmetic(), problems)).answers == ["3"]
    with pytest.raises(ValueError, match=r"unknown scorer 'oracle'"):
        best_of_n(gen, TOK, TASK, "oracle")


def test_best_of_majority():
    gen = make_gen([[("1",), ("1",), ("1",), ("2",), ("2",), ("3",)]])
    reward = np.array([[0.1, 0.2, 0.3, 0.9, 0.4, 1.0]])
    pick = lambda alpha: best_of_majority(gen, TOK, TASK, alpha, reward).chosen_B.tolist()[0]
    assert pick(0.3) == 3  # pi = 1/2, 1/3, 1/6: S = {1, 2}; best reward in S is sample 3
    assert pick(0.5) == 2  # S = {1}
    assert pick(0.0) == 5  # S = every answer: best-of-n
    assert pick(0.9) == 2  # no answer reaches alpha: S = the mode {1}
    # pi counts all R samples: 1 has 2/6 >= 1/3, 2 has 1/6 (over answerable samples only, 2 would reach 1/3 too).
    gen = make_gen([[("1",), ("1",), ("2",), (None,), (None,), (None,)]])
    res = best_of_majority(gen, TOK, TASK, 1 / 3, np.array([[0.0, 0.0, 1.0, 5.0, 5.0, 5.0]]))
    assert (res.answers, res.chosen_B.tolist()) == (["1"], [0])  # reward tie in S: lowest index
    assert res.used_BR.tolist() == [[True, True, False, False, False, False]]
    with pytest.raises(ValueError, match=r"alpha=1.5 must be a number in \[0, 1\]"):
        best_of_majority(gen, TOK, TASK, 1.5)


def test_weibull_mixture_recovers_known_parameters():
    rng = np.random.default_rng(0)
    n_low, n_high = 1600, 2400  # weights 0.4 / 0.6
    x = np.concatenate([0.3 * rng.weibull(4.0, n_low), 0.8 * rng.weibull(12.0, n_high)])
    mix = fit_weibull_mixture(rng.permutation(x))
    np.testing.assert_allclose(mix.weights, (0.4, 0.6), atol=0.02)
    np.testing.assert_allclose(mix.shapes, (4.0, 12.0), rtol=0.1)
    np.testing.assert_allclose(mix.scales, (0.3, 0.8), rtol=0.03)
    post = mix.lower_posterior([0.25, 0.8])
    assert post[0] > 0.99 and post[1] < 0.01
    with pytest.raises(ValueError, match="positive"):
        fit_weibull_mixture([0.5, 0.0, 0.2])


def test_rpc_prunes_the_low_probability_component():
    p = np.array([0.90, 0.88, 0.86, 0.84, 0.35, 0.33, 0.31, 0.24])
    answers = ["1", "2", "1", "3", "2", "2", "2", "3"]
    gen = make_gen([[(a, None, True, f"t{r}") for r, a in enumerate(answers)]], mean_logprobs=np.log([p]))
    pruned = [False] * 4 + [True] * 4
    assert rpc_pruned(p).tolist() == pruned
    res = rpc(gen, TOK, TASK)
    np.testing.assert_allclose(res.scores_BR[0], p, rtol=1e-6)
    assert res.used_BR[0].tolist() == [not x for x in pruned]
    # Kept: 1 -> 0.90 + 0.86, 2 -> 0.88, 3 -> 0.84. Unpruned, 2 would win (0.88 + 0.35 + 0.33 + 0.31 = 1.87).
    assert (res.answers, res.chosen_B.tolist()) == (["1"], [0])
    assert weighted_majority(gen, TOK, TASK).answers == ["2"]


def test_rpc_counts_identical_completions_once():
    same = ids("1", think="a")
    gen = make_gen([[same, same, same, ids("2", think="b"), ids("2", think="c")]])
    assert majority_vote(gen, TOK, TASK).answers == ["1"]
    res = rpc(gen, TOK, TASK)  # equal p: nothing pruned; 1 counts once (p), 2 twice (2p)
    assert res.used_BR.all() and (res.answers, res.chosen_B.tolist()) == (["2"], [3])
    assert not rpc_pruned(np.full(5, math.exp(-0.7))).any()


def test_first_finish():
    gen = make_gen([[("1", 9, False), ("2", 9), ("3", 7), ("4", 7)],  # 2 and 3 tie at 7 tokens: lowest index
                    [("5", 9), (None, 6), ("6", 8), ("7", 9, False)],  # the first finisher has no answer
                    [("1", 9, False)] * 4])  # none finished
    res = first_finish(gen, TOK, TASK)
    assert res.answers == ["3", None, None] and res.chosen_B.tolist() == [2, 1, -1]
    assert res.used_BR.tolist() == [[False, False, True, False], [False, True, False, False], [False] * 4]


def test_short_m_at_k_votes_over_the_m_shortest_finished():
    # Sample 4 is shortest but unfinished; finished by (length, index): 1, 2, 5 (8 tokens), 3 (10), 0 (11).
    row = [("a", 11), ("x", 8), ("b", 8), ("a", 10), ("a", 6, False), ("b", 8)]
    gen = make_gen([row])
    res = short_m_at_k(gen, TOK, TASK, 3)
    assert res.used_BR.tolist() == [[False, True, True, False, False, True]]
    assert (res.answers, res.chosen_B.tolist()) == (["b"], [2])
    res = short_m_at_k(gen, TOK, TASK, 2)  # x vs b, one vote each, both 8 tokens: the lower index
    assert (res.answers, res.chosen_B.tolist()) == (["x"], [1])
    # A count tie goes to the shortest sample, not to the first occurrence.
    tie = make_gen([[("y", 9), ("x", 8), ("z", 12)]])
    assert short_m_at_k(tie, TOK, TASK, 2).answers == ["x"] and majority_vote(tie, TOK, TASK).answers == ["y"]
    res = short_m_at_k(make_gen([[("a", 9, False), ("b", 8)]]), TOK, TASK, 2)  # fewer than m finished
    assert res.answers == ["b"] and res.used_BR.tolist() == [[False, True]]
    with pytest.raises(ValueError, match=r"m=4 must be an int >= 1 and <= the samples per prompt R=2"):
        short_m_at_k(make_gen([[("a", 9), ("b", 8)]]), TOK, TASK, 4)


# ---------------------------------------------------------------------------------------------------------------
# With a real tiny model (random weights): a token-id "tokenizer" and a task whose answer is read off the first
# token, so samples collide and some are unanswerable.


class IdTokenizer:
    eos_id, pad_id = 2, 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


class FirstTokenTask:
    name = "first_token"

    def extract_answer(self, text):
        first = int(text.split()[0])
        return None if first % 5 == 0 else str(first % 3)

    def score(self, problem, completion):
        return float(self.extract_answer(completion) == problem.answer)


PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5], [42]]
PROBLEMS = [Problem(prompt="", answer=a) for a in ("0", "1", "2")]
STOPS = range(0, 128, 4)
NEW = 16


def run(tiny, name, **kw):
    model, params = tiny("llama-tiny")
    kw = dict(tok=IdTokenizer(), task=FirstTokenTask(), problems=PROBLEMS, sampler=Sampler(temperature=1.0),
              rng=jax.random.key(0), max_new_tokens=NEW, stop_tokens=STOPS) | kw
    return run_method(name, model, params, PROMPTS, **kw)


def test_short_m_at_k_stops_when_m_finish_and_votes_over_them(tiny):
    k, m = 6, 2
    res = run(tiny, "short_m_at_k", k=k, m=m)
    lengths, finished = res.lengths_BR, res.finished_BR
    # Each prompt's samples stopped when it had m finished (its unfinished rows were cut there), and the loop
    # when every prompt had: a prompt that settles early costs only its own first m finishes.
    n_B = np.array([np.sort(lengths[b][finished[b]])[m - 1] for b in range(len(PROMPTS))])
    assert res.decode_steps == n_B.max() - 1 < NEW - 1 and res.model_calls == n_B.max()
    assert n_B.min() < n_B.max()  # the prompts settle at different steps: the per-prompt stop is exercised
    for b in range(len(PROMPTS)):
        assert (lengths[b][~finished[b]] == n_B[b]).all() and (lengths[b] <= n_B[b]).all()
    assert res.tokens_generated == lengths.sum() < len(PROMPTS) * k * NEW
    for b in range(len(PROMPTS)):
        order = sorted(np.flatnonzero(finished[b]), key=lambda r: (lengths[b, r], r))[:m]
        assert np.flatnonzero(res.used_BR[b]).tolist() == sorted(order)
        votes = [res.answers_BR[b][r] for r in order if res.answers_BR[b][r] is not None]
        want = max(votes, key=lambda a: (votes.count(a), -votes.index(a))) if votes else None  # tie: shortest
        assert res.answers[b] == want
        c = res.chosen_B[b]
        assert res.task_scores_B[b] == (0.0 if c < 0 else float(res.answers[b] == PROBLEMS[b].answer))
    assert res.accuracy == res.task_scores_B.mean()


def test_ffs_returns_the_first_finished_sample(tiny):
    res = run(tiny, "ffs", k=4)
    lengths, finished = res.lengths_BR, res.finished_BR
    firsts = [lengths[b][finished[b]].min() for b in range(len(PROMPTS))]
    assert res.decode_steps == max(firsts) - 1
    for b, c in enumerate(res.chosen_B):
        assert finished[b, c] and lengths[b, c] == firsts[b]
        assert c == np.flatnonzero(finished[b] & (lengths[b] == firsts[b]))[0]
        assert res.answers[b] == res.answers_BR[b][c]


@pytest.mark.parametrize("name, kw, match", [
    ("beam", dict(k=2), r"unknown test-time scaling method 'beam'; known: greedy, majority, .*short_m_at_k"),
    ("majority", dict(k=0), r"k=0 must be an int >= 1"),
    ("short_m_at_k", dict(k=4, m=0), r"m=0 must be an int >= 1"),
    ("short_m_at_k", dict(k=4, m=5), r"m=5 must be an int >= 1 and <= k=4"),
    ("short_m_at_k", dict(k=4), r"short_m_at_k needs m"),
    ("bom", dict(k=4), r"bom needs alpha"),
    ("bom", dict(k=4, alpha=2), r"alpha=2 must be a number in \[0, 1\]"),
    ("best_of_n", dict(k=4, scorer="oracle"), r"unknown scorer 'oracle'"),
    ("majority", dict(k=4, problems=PROBLEMS[:2]), r"2 problems for 3 prompts"),
])
def test_run_method_bad_input(name, kw, match):
    kw = dict(tok=IdTokenizer(), task=FirstTokenTask(), problems=PROBLEMS, max_new_tokens=NEW) | kw
    with pytest.raises(ValueError, match=match):
        run_method(name, None, None, PROMPTS, **kw)
