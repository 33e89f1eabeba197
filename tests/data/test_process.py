"""Process verifiers: every reference trace (and every prefix of a reference completion) is valid, one corrupted
digit / number / node makes exactly its step invalid, any legal countdown DFS is accepted and illegal searches are
not, the prefix reward and the particle-filter scorer built on them, which lets particle filtering beat best-of-N."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmx.data.tasks import Arithmetic, Countdown, Problem, ShortestPath, format_target
from lmx.data.tasks.process import prefix_reward, prefix_scorer, split_steps, step_scores
from lmx.data.tokenizer import EOS, CharTokenizer
from lmx.decoding import Sampler, astar_search, generate, particle_filter

TOK = CharTokenizer()
HI, LO = 0.99, 0.01  # 1 - ε and ε at the default ε
TASKS = {
    "arith-full": Arithmetic(num_digits=(1, 4), ops=("+", "-", "*"), cot="full"),
    "arith-short": Arithmetic(num_digits=(1, 4), ops=("+", "-", "*"), cot="short"),
    "arith-mixed": Arithmetic(num_digits=(1, 4), ops=("+", "-", "*"), cot="mixed"),
    "countdown": Countdown(),
    "countdown-3": Countdown(num_numbers=3, max_trace_steps=8),
    "shortest-path": ShortestPath(),
}


def _problems(name, n=40):
    return TASKS[name].sample(np.random.default_rng(list(TASKS).index(name)), n)


def _completion(problem):
    return format_target(problem) + EOS


@pytest.mark.parametrize("name", TASKS)
def test_reference_traces_and_all_their_prefixes_are_valid(name):
    task = TASKS[name]
    for p in _problems(name):
        text = _completion(p)
        assert step_scores(task, p, text) == [1.0] * len(p.cot.split(";"))
        ids = TOK.encode(text)
        # A prefix of a correct completion is always a valid prefix (cut anywhere: mid-step, mid-answer).
        assert all(prefix_reward(task, p, TOK.decode(ids[:k])) == HI for k in range(len(ids) + 1))


def _corrupt(step: str, rng, alphabet: str) -> str:
    """The step with one of its `alphabet` characters replaced by another one."""
    at = [i for i, c in enumerate(step) if c in alphabet]
    i = at[int(rng.integers(len(at)))]
    return step[:i] + rng.choice([c for c in alphabet if c != step[i]]) + step[i + 1:]


@pytest.mark.parametrize("name", TASKS)
def test_one_wrong_digit_or_node_makes_that_step_invalid(name):
    task, rng = TASKS[name], np.random.default_rng(0)
    alphabet = "ABCDEFGH" if name == "shortest-path" else "0123456789"
    checked = 0
    for p in _problems(name):
        steps = p.cot.split(";")
        k = int(rng.integers(len(steps)))
        if not any(c in alphabet for c in steps[k]):  # a subtraction's "neg" flag has no digit
            continue
        steps[k] = _corrupt(steps[k], rng, alphabet)
        scores = step_scores(task, p, "<think>" + ";".join(steps) + "</think>")
        assert scores[:k] == [1.0] * k and scores[k] == 0.0
        # Arithmetic columns and BFS steps are judged against the true state; a search after an illegal move has
        # no state, so countdown scores every later step 0.
        assert scores[k + 1:] == [0.0 if name.startswith("countdown") else 1.0] * (len(steps) - k - 1)
        assert prefix_reward(task, p, "<think>" + ";".join(steps[: k + 1]) + ";") == LO
        checked += 1
    assert checked >= 30


def test_mixed_arithmetic_accepts_either_form_but_not_both_in_one_trace():
    task = TASKS["arith-mixed"]
    full, short = task.make(347, 285, "+", form="full"), task.make(347, 285, "+", form="short")
    assert full.cot != short.cot
    for p in (full, short):
        assert step_scores(task, full, _completion(p)) == [1.0, 1.0, 1.0]
    assert step_scores(task, full, "<think>7+5+0=12;13;06</think>") == [1.0, 0.0, 0.0]
    assert step_scores(task, full, "<think>12;4+8+1=13;") == [1.0, 0.0]
    neg = task.make(285, 347, "-", form="short")  # "neg;..." in both forms: the first column step decides
    assert step_scores(task, neg, "<think>neg;") == [1.0]
    assert step_scores(task, neg, _completion(neg)) == [1.0] * 4
    assert step_scores(task, neg, _completion(task.make(285, 347, "-", form="full"))) == [1.0] * 4
    assert step_scores(Arithmetic(cot="full"), full, _completion(short)) == [0.0, 0.0, 0.0]  # fixed form: full only
    assert step_scores(Arithmetic(cot="none"), full, "<think>12;</think>") == [0.0, 0.0]


CD = Countdown()  # numbers 3, 5, 7, 2, target 29 (7*5-3*2); max_trace_steps 16, so exploring stops at step 13
CD_PROBLEM = Problem("", "7*5-3*2", "", {"numbers": [3, 5, 7, 2], "target": 29})
SOLVE = ["7*5=35|3,2,35", "3*2=6|35,6", "35-6=29|!"]


def _cd(steps, task=CD):
    return step_scores(task, CD_PROBLEM, "<think>" + ";".join(steps) + "</think>")


def test_countdown_accepts_any_legal_depth_first_search():
    for seed in range(8):  # the generator's traces for other move orders
        p = CD.make([3, 5, 7, 2], 29, np.random.default_rng(seed))
        assert _cd(p.cot.split(";")) == [1.0] * len(p.cot.split(";"))
    assert _cd(SOLVE) == [1.0] * 3  # straight to the solution
    explore = ["5+2=7|3,7,7", "7/7=1|3,1", "3/1=3|x", "3-1=2|x", "3+1=4|x", "3*1=3|x"]  # (3,1) exhausted
    assert _cd(explore + ["7*3=21|7,21"] + ["21+7=28|x"]) == [1.0] * 8  # back up one level, a sibling state
    assert _cd(explore + ["3*2=6|5,7,6"]) == [1.0] * 6 + [0.0]  # a root move, but (3,7,7) has moves left
    assert _cd(["5+2=7|3,7,7", *SOLVE]) == [1.0, 0.0, 0.0, 0.0]  # leaves (3,7,7) with moves left
    assert prefix_reward(CD, CD_PROBLEM, "<think>" + ";".join(SOLVE) + "</think><answer>7*5-3*2</answer>") == HI
    assert prefix_reward(CD, CD_PROBLEM, "<think>" + ";".join(explore) + "</think>") == LO  # closed, unsolved


@pytest.mark.parametrize("steps, bad", [
    (["5+2=7|3,7,7", "7/7=1|3,1", "3/1=3|x", "3/1=3|x"], 3),  # the same move twice
    (["5+2=7|3,7,7", "5+3=8|7,8"], 1),  # 5 is used up
    (["5+2=7|7,3,7"], 0),  # the rest list out of the generator's order
    (["3-5=2|7,2,2"], 0),  # the larger number comes first (positive intermediate values)
    (["7/2=3|3,5,3"], 0),  # inexact division
    (["7*5=35|3,2,35", "3*2=6|35,6", "35-6=29|x"], 2),  # the target is hit: "|!", not a dead end
    (["7*5=35|3,2,35", "3*2=6|35,6", "35-6=29|29"], 2),
    (["5+2=7|3,7,7", "7/7=1|3,1", "3/1=3|!"], 2),  # a dead end is not a solution
    ([*SOLVE, "3+2=5|x"], 3),  # nothing after the solution
    (["5*2=12|3,7,12"], 0),  # c wrong
])
def test_countdown_rejects_illegal_steps(steps, bad):
    assert _cd(steps) == [1.0] * bad + [0.0] * (len(steps) - bad)


def test_countdown_trace_budget_allows_only_solvable_moves_once_exploring_must_stop():
    ref = "5+2=7|3,7,7;7/7=1|3,1;3/1=3|x;3-1=2|x;3+1=4|x;3*1=3|x;7+3=10|7,10;10+7=17|x;10*7=70|x;10-7=3|x;" \
          "7-3=4|7,4;7+4=11|x;7*4=28|x".split(";")  # 13 steps; then (7,4) has only 7-4=3, a dead end
    assert _cd([*ref, "7-4=3|x"]) == [1.0] * 13 + [0.0]  # step 13: 13 + 1 + 3 > 16, dead ends are pruned
    assert _cd([*ref, "7-4=3|x"], Countdown(max_trace_steps=32)) == [1.0] * 14  # a bigger budget explores it
    assert _cd([*ref, *SOLVE]) == [1.0] * 16  # (7,4) and (3,7,7) are left (pruned), the root goes on


def test_shortest_path_steps_follow_the_bfs():
    task = ShortestPath()
    edges = [("A", "B"), ("A", "C"), ("B", "D"), ("C", "D"), ("D", "E")]
    p = task.make(edges, "A", "E")
    assert p.cot == "A:B,C;B:D;C:;D:E"
    assert step_scores(task, p, "<think>A:B,C;B:D;C:;D:E</think>") == [1.0] * 4
    assert step_scores(task, p, "<think>A:C,B;C:D;B:;D:E</think>") == [0.0, 0.0, 0.0, 1.0]  # order is the queue's
    assert step_scores(task, p, "<think>A:B,C;B:D;C:D;D:E;E:</think>") == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert prefix_reward(task, p, "<think>A:B,C;B:D</think>") == LO  # closed before discovering the target
    assert prefix_reward(task, p, "<think>A:B,C;B:D;C:;D:E</think><answer>A-C-D-E</answer>") == HI  # any shortest
    assert prefix_reward(task, p, "<think>A:B,C;B:D;C:;D:E</think><answer>A-E</answer>") == LO
    assert step_scores(ShortestPath(cot=False), p, "<think>A:B,C;</think>") == [0.0, 0.0]


def test_split_steps_and_prefix_reward_edges():
    assert split_steps("<think>12;13;0") == (["12", "13"], False)
    assert split_steps("<think>12;13;") == (["12", "13"], False)
    assert split_steps("12;13;06</think>") == (["12", "13", "06"], True)  # the prompt opened the thought
    assert split_steps("<think>12;13<answer>") == (["12", "13"], True)
    assert split_steps("<think>12;1<eos>") == (["12", "1"], True)
    assert split_steps("<think></think>") == ([], True)
    task = Arithmetic(cot="short")
    p = task.make(347, 285, "+")
    assert prefix_reward(task, p, "<think>12;13;0") == HI
    assert prefix_reward(task, p, "<think>12;13;0", final=True) == LO  # out of budget: it can never finish
    assert prefix_reward(task, p, "<think>12;13;06</think><answer>632<eos>") == LO  # stopped, answer unwritten
    assert prefix_reward(task, p, "<think>12;13;06</think><answer>633</answer>") == LO
    assert prefix_reward(task, p, "<think>12;14;06</think><answer>632</answer>") == LO  # right answer, wrong step
    assert prefix_reward(task, p, "<think>12;13;06", eps=0.2) == 0.8
    with pytest.raises(ValueError, match="eps=0.5"):
        prefix_reward(task, p, "", eps=0.5)
    with pytest.raises(TypeError, match="no process verifier"):
        step_scores(object(), p, "<think>12;")


def test_prefix_scorer_decodes_particles_and_judges_rows_at_the_budget_final():
    task = Arithmetic(cot="short")
    problems = [task.make(347, 285, "+"), task.make(12, 34, "+")]
    texts = [["<think>12;13;", "<think>12;14;"], ["<think>06;", "<think>06;04</think><answer>46</answer>"]]
    T = 48
    tokens = np.zeros((2, 2, T), np.int32)
    lengths = np.zeros((2, 2), np.int32)
    for (b, n), text in np.ndenumerate(np.array(texts, dtype=object)):
        ids = TOK.encode(text)
        tokens[b, n, : len(ids)], lengths[b, n] = ids, len(ids)
    scorer = prefix_scorer(task, problems)
    np.testing.assert_allclose(scorer(tokens, lengths), [[HI, LO], [HI, HI]])
    ids = TOK.encode("<think>12;13;")
    short = np.zeros((2, 2, len(ids)), np.int32)
    short[:, :] = ids
    np.testing.assert_allclose(scorer(short, np.full((2, 2), len(ids))), LO)  # at the budget: final, unfinished
    tokens[0, 0, 3] = 120  # outside the tokenizer's vocabulary (a padded model vocabulary)
    assert scorer(tokens, lengths)[0, 0] == LO
    with pytest.raises(ValueError, match="2 problems but got 1"):
        scorer(tokens[:1], lengths[:1])


# ---------------------------------------------------------------------- the verifier as a particle filter's scorer
def _fit(model, params, problems, tok, steps=60):
    """A tiny model that memorises each problem's reference completion (a few seconds on CPU)."""
    seqs = [tok.encode(p.prompt, add_bos=True) + tok.encode(format_target(p), add_eos=True) for p in problems]
    x = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    mask = np.zeros(x.shape, np.float32)
    for i, (s, p) in enumerate(zip(seqs, problems, strict=True)):
        x[i, : len(s)] = s
        mask[i, len(tok.encode(p.prompt, add_bos=True)): len(s)] = 1  # completion tokens only
    opt = optax.adam(1e-2)

    def loss(params):
        logp = jax.nn.log_softmax(model.apply({"params": params}, x[:, :-1]).logits_BTV)
        return -(jnp.take_along_axis(logp, x[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum() / mask.sum()

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


@pytest.fixture(scope="module")
def memorised(tiny):
    """An imperfect model, constructed: training one to be imperfect at arithmetic in general takes minutes, so a
    tiny model memorises two 5-digit additions (full column CoT, ~55 tokens) and is sampled at τ = 2, where most
    samples slip somewhere. 8 copies of each prompt; best-of-M with M = 12 independent samples as the baseline."""
    tok = TOK
    task = Arithmetic(num_digits=(5, 5), cot="full")
    problems = [task.make(47285, 91736, "+"), task.make(30518, 64927, "+")] * 8
    model, params = tiny("llama-tiny", num_layers=1, vocab_size=tok.vocab_size)
    params = _fit(model, params, problems[:2], tok)
    prompts = [tok.encode(p.prompt, add_bos=True) for p in problems]
    kw = dict(max_new_tokens=64, sampler=Sampler(2.0), stop_tokens=(tok.eos_id,), rng=jax.random.key(0))
    g = jax.device_get(generate(model, params, prompts, num_samples=12, **kw))
    correct = np.array([[task.score(p, tok.decode(g.tokens_BRT[b, r, : g.lengths_BR[b, r]])) for r in range(12)]
                        for b, p in enumerate(problems)])
    assert correct.mean() < 0.1  # the model is imperfect: most samples are wrong somewhere
    return task, problems, model, params, prompts, kw, g, correct


def _scored(task, problems, gen, pick_B):
    return np.array([task.score(p, TOK.decode(gen.tokens_BRT[b, pick_B[b], : gen.lengths_BR[b, pick_B[b]]]))
                     for b, p in enumerate(problems)])


def test_particle_filtering_with_the_process_verifier_beats_best_of_n(memorised):
    """Particle filtering with N = 8 and the exact column verifier (steps end at ';' or '</think>') against
    best-of-12, which spends at least as many tokens."""
    task, problems, model, params, prompts, kw, g, correct = memorised
    pf = jax.device_get(particle_filter(model, params, prompts, num_particles=8, scorer=prefix_scorer(task, problems),
                                        step_token=(TOK.encode(";")[0], TOK.end_think_id), **kw))
    pf_correct = _scored(task, problems, pf, pf.rewards_BR.argmax(1))
    assert int(g.stats["tokens_generated"]) >= int(pf.stats["tokens_generated"])  # best-of-M spends no less
    assert pf_correct.mean() >= 0.75 and pf_correct.mean() > correct.max(1).mean() + 0.5  # beats even any-correct


def test_astar_search_with_the_process_verifier_beats_best_of_n_on_half_the_tokens(memorised):
    """A* over the verifier's steps (expand 2, frontier 4, 400 tokens a prompt) against best-of-12 with over twice
    its tokens."""
    task, problems, model, params, prompts, kw, g, correct = memorised
    a = jax.device_get(astar_search(model, params, prompts, expand=2, frontier=4, token_budget=400,
                                    scorer=prefix_scorer(task, problems),
                                    step_token=(TOK.encode(";")[0], TOK.end_think_id), **kw))
    a_correct = _scored(task, problems, a, np.zeros(len(problems), int))
    assert 2 * int(a.stats["tokens_generated"]) <= int(g.stats["tokens_generated"])
    assert a_correct.mean() >= 0.75 and a_correct.mean() > correct.max(1).mean() + 0.5
