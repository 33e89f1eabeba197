import re
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmx.data.tasks import (
    Arithmetic,
    Countdown,
    Problem,
    ShortestPath,
    Task,
    extract_answer,
    format_target,
    get_task,
)
from lmx.data.tasks.countdown import evaluate

seeds = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=25, deadline=None)


def with_answer(problem: Problem, answer: str) -> str:
    return format_target(Problem(problem.prompt, answer, problem.cot, problem.meta))


# ------------------------------------------------------------------------------------------ shared
def test_format_target_and_extract_answer():
    p = Problem("1+2=", "3", cot="1+2+0=03")
    assert format_target(p) == "<think>1+2+0=03</think><answer>3</answer>"
    assert format_target(p, cot=False) == "<think></think><answer>3</answer>"
    assert extract_answer("<answer>1</answer> then <answer> 7 </answer>") == "7"
    assert extract_answer("<answer>1</answer><answer>7") is None
    assert extract_answer("no tags") is None


def test_registry():
    assert isinstance(get_task("arithmetic", ops=("+", "*")), Arithmetic)
    assert isinstance(get_task("countdown"), Countdown)
    assert isinstance(get_task("shortest_path", num_nodes=6, num_edges=7), ShortestPath)
    for name in ("arithmetic", "countdown", "shortest_path"):
        assert isinstance(get_task(name), Task)
    with pytest.raises(ValueError, match="'sudoku'"):
        get_task("sudoku")
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops=("/",))


# -------------------------------------------------------------------------------------- arithmetic
def test_arithmetic_golden_formats():
    full, short = Arithmetic(ops=("+", "-", "*")), Arithmetic(cot="short")
    assert full.make(347, 285, "+").cot == "7+5+0=12;4+8+1=13;3+2+1=06"
    assert short.make(347, 285, "+").cot == "12;13;06"
    assert full.make(347, 285, "-").cot == "7-5-0=02;4-8-0=16;3-2-1=00"
    assert full.make(285, 347, "-").answer == "-62" and full.make(285, 347, "-").cot.startswith("neg;")
    assert full.make(347, 285, "*").cot == (
        "347*5=1735;347*80=27760;347*200=69400;1735+27760=29495;29495+69400=98895")
    assert full.make(99, 1, "+").answer == "100" and full.make(99, 1, "+").prompt == "99+1="


@FAST
@given(seeds, st.sampled_from(["+", "-", "*"]), st.sampled_from(["full", "short", "none"]))
def test_arithmetic_verifier(seed, op, cot):
    task = Arithmetic(num_digits=(1, 4), ops=(op,), cot=cot)
    for p in task.sample(np.random.default_rng(seed), 8):
        a, b = p.meta["a"], p.meta["b"]
        assert p.prompt == f"{a}{op}{b}="
        assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert task.score(p, format_target(p)) == 1.0
        assert task.score(p, format_target(p, cot=False)) == 1.0
        i = seed % len(p.answer.lstrip("-")) + (p.answer[0] == "-")
        wrong = p.answer[:i] + str((int(p.answer[i]) + 1) % 10) + p.answer[i + 1 :]
        assert task.score(p, with_answer(p, wrong)) == 0.0
        assert task.score(p, "<answer>") == 0.0


@FAST
@given(seeds)
def test_arithmetic_addition_trace_spells_the_answer(seed):
    # Reading the column digits back (and the last carry) must give the answer: the CoT is a real trace.
    for p in Arithmetic(num_digits=(1, 5)).sample(np.random.default_rng(seed), 8):
        cols = [step.split("=")[1] for step in p.cot.split(";")]
        digits = "".join(c[1] for c in reversed(cols))
        assert int(cols[-1][0] + digits) == int(p.answer)


def test_cot_length_follows_option():
    lengths = {}
    for cot in ("full", "short", "none"):
        ps = Arithmetic(ops=("+", "-", "*"), cot=cot).sample(np.random.default_rng(0), 50)
        lengths[cot] = sum(len(p.cot) for p in ps)
        assert [p.answer for p in ps] == [p.answer for p in Arithmetic(ops=("+", "-", "*")).sample(
            np.random.default_rng(0), 50)]  # same problems, only the CoT differs
    assert lengths["full"] > 2 * lengths["short"] > 0 and lengths["none"] == 0


@pytest.mark.parametrize("short_frac", [0.25, 0.7])
def test_mixed_cot_samples_both_forms_for_the_same_answers(short_frac):
    task = Arithmetic(num_digits=(2, 3), ops=("+", "-"), cot="mixed", short_frac=short_frac)
    ps = task.sample(np.random.default_rng(0), 400)
    forms = [p.meta["cot_form"] for p in ps]
    assert set(forms) == {"full", "short"}
    assert abs(forms.count("short") / len(ps) - short_frac) < 0.07  # binomial sd ≈ 0.023
    full, short = Arithmetic(ops=("+", "-"), cot="full"), Arithmetic(ops=("+", "-"), cot="short")
    for p in ps:
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert p.cot == (short if p.meta["cot_form"] == "short" else full).make(a, b, op).cot
        assert task.score(p, format_target(p)) == 1.0
    # the same seed gives the same problems and forms; make() stays deterministic (the full form)
    assert task.sample(np.random.default_rng(0), 400) == ps
    assert task.make(347, 285, "+").cot == "7+5+0=12;4+8+1=13;3+2+1=06"
    assert task.make(347, 285, "+", form="short").cot == "12;13;06"
    with pytest.raises(ValueError, match="short_frac"):
        Arithmetic(cot="full", short_frac=0.3)
    with pytest.raises(ValueError, match="short_frac"):
        Arithmetic(cot="mixed", short_frac=1.5)


# --------------------------------------------------------------------------------------- countdown
def test_countdown_parser():
    assert evaluate("2+3*4") == (14, [2, 3, 4])
    assert evaluate("(2+3)*4")[0] == 20
    assert evaluate("8/4/2")[0] == 1 and evaluate("8-4-2")[0] == 2
    assert evaluate(" 7 / 2 ")[0] == Fraction(7, 2)
    for bad in ["", "3+", "(3+5", "-3+5", "3 5", "__import__('os')", "1/0", "2**3", "1" * 300]:
        with pytest.raises(ValueError):
            evaluate(bad)


STEP_RE = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)\|(.*)")


@FAST
@given(seeds, st.integers(3, 24))
def test_countdown_verifier_and_trace(seed, max_steps):
    task = Countdown(max_trace_steps=max_steps)
    for p in task.sample(np.random.default_rng(seed), 6):
        numbers, target = p.meta["numbers"], p.meta["target"]
        value, used = evaluate(p.answer)
        assert value == target and not Counter(used) - Counter(numbers)
        assert task.score(p, format_target(p)) == 1.0
        steps = p.cot.split(";")
        assert len(steps) <= max_steps and steps[-1].endswith("|!")
        for step in steps:  # every step is a correct positive-integer move
            a, op, b, c, _ = STEP_RE.fullmatch(step).groups()
            assert Fraction(int(c)) == evaluate(f"{a}{op}{b}")[0] and int(a) >= int(b)
        # corruptions: wrong value gets partial credit, overusing a number too, junk gets nothing
        assert task.score(p, with_answer(p, f"({p.answer})+1")) == 0.1
        x = numbers[0]
        extra = Counter(numbers)[x] - Counter(used)[x] + 1
        assert task.score(p, with_answer(p, f"({p.answer})" + f"+{x}-{x}" * extra)) == 0.1
        assert task.score(p, with_answer(p, f"{p.answer})")) == 0.0
        assert task.score(p, p.answer) == 0.0  # no answer tags


def test_countdown_traces_explore_dead_ends():
    ps = Countdown().sample(np.random.default_rng(0), 40)
    assert sum(p.meta["dead_ends"] > 0 for p in ps) >= 10
    assert all(p.meta["dead_ends"] == p.cot.count("|x") for p in ps)
    # With no room to explore, the search walks straight to a solution.
    direct = Countdown(max_trace_steps=3).sample(np.random.default_rng(0), 40)
    assert all("|x" not in p.cot and len(p.cot.split(";")) <= 3 for p in direct)
    assert sum(len(p.cot) for p in direct) < sum(len(p.cot) for p in ps)


def test_countdown_is_deterministic_and_solvable_only():
    a = Countdown().sample(np.random.default_rng(5), 10)
    assert a == Countdown().sample(np.random.default_rng(5), 10)
    assert all(p.meta["target"] not in p.meta["numbers"] for p in a)
    with pytest.raises(ValueError, match="not reachable"):
        Countdown().make([1, 1, 1, 1], 97, np.random.default_rng(0))


# ----------------------------------------------------------------------------------- shortest path
def all_pairs_distances(nodes, edges):
    """Floyd-Warshall, independent of the task's BFS."""
    inf = float("inf")
    d = {(u, v): 0 if u == v else inf for u in nodes for v in nodes}
    for u, v in edges:
        d[u, v] = d[v, u] = 1
    for k in nodes:
        for i in nodes:
            for j in nodes:
                d[i, j] = min(d[i, j], d[i, k] + d[k, j])
    return d


def is_shortest(path, meta, dist):
    edges = {frozenset(e) for e in meta["edges"]}
    return (path[0] == meta["source"] and path[-1] == meta["target"]
            and len(path) - 1 == dist[meta["source"], meta["target"]]
            and all(frozenset(e) in edges for e in zip(path, path[1:], strict=False)))


@FAST
@given(seeds)
def test_shortest_path_verifier(seed):
    task = ShortestPath(num_nodes=7, num_edges=9)
    nodes = "ABCDEFG"
    for p in task.sample(np.random.default_rng(seed), 6):
        dist = all_pairs_distances(nodes, [tuple(e) for e in p.meta["edges"]])
        path = p.answer.split("-")
        assert is_shortest(path, p.meta, dist) and len(path) >= 3
        assert task.score(p, format_target(p)) == 1.0
        assert p.cot.split(";")[0].startswith(p.meta["source"] + ":")
        assert p.meta["target"] in p.cot.split(";")[-1].split(":")[1]
        dropped = path[:1] + path[2:]
        doubled = path[:2] + path[1:]
        assert task.score(p, with_answer(p, "-".join(dropped))) == 0.0
        assert task.score(p, with_answer(p, "-".join(doubled))) == 0.0
        for node in nodes:  # swap an inner node: accepted exactly when it is still a shortest path
            swapped = path[:1] + [node] + path[2:]
            want = float(is_shortest(swapped, p.meta, dist))
            assert task.score(p, with_answer(p, "-".join(swapped))) == want


def test_shortest_path_accepts_any_shortest_path():
    task = ShortestPath(num_nodes=5, num_edges=5)
    p = task.make([("A", "B"), ("B", "D"), ("A", "C"), ("C", "D"), ("D", "E")], "A", "E")
    assert p.answer == "A-B-D-E" and p.cot == "A:B,C;B:D;C:;D:E"
    for answer, want in [("A-C-D-E", 1.0), ("A - B - D - E", 1.0), ("A-B-D", 0.0), ("A-B-A-C-D-E", 0.0),
                         ("A-B-C-D-E", 0.0), ("", 0.0)]:
        assert task.score(p, with_answer(p, answer)) == want, answer
    assert ShortestPath(cot=False).sample(np.random.default_rng(0), 1)[0].cot == ""
