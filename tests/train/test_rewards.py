"""Rewards: each registered reward against an independent NumPy transcription of its formula (ALGORITHMS §1–2),
edge cases, token (not character) lengths, the registry and the shape check."""

import functools
import math

import jax
import numpy as np
import pytest

from lmx.data.tasks.arithmetic import Arithmetic
from lmx.data.tasks.base import format_target
from lmx.data.tokenizer import CharTokenizer
from lmx.train import rewards as rw

TOK = CharTokenizer()
NAMES = ("correctness", "dapo_overlong", "format", "kimi_length", "l1_exact", "l1_max", "lead", "o1_pruner",
         "shorter_better")


# ---------------------------------------------------------------------------------------------------------------
# Independent NumPy transcriptions (loops over groups and rows, float64)


def np_correctness(s, L, valid, binary=False, thr=1.0, **_):
    out = np.zeros(s.shape)
    for b, r in np.ndindex(s.shape):
        if valid[b, r]:
            out[b, r] = math.nan if math.isnan(s[b, r]) else (float(s[b, r] >= thr) if binary else s[b, r])
    return out


def np_dapo(L, valid, L_max, L_c):
    out = np.zeros(L.shape)
    for b, r in np.ndindex(L.shape):
        y = L[b, r]
        if not valid[b, r]:
            continue
        if y <= L_max - L_c:
            out[b, r] = 0.0
        elif y <= L_max:
            out[b, r] = ((L_max - L_c) - y) / L_c
        else:
            out[b, r] = -1.0
    return out


def np_kimi(s, L, valid, thr=1.0):
    out = np.zeros(s.shape)
    for b in range(s.shape[0]):
        rows = [r for r in range(s.shape[1]) if valid[b, r]]
        if not rows:
            continue
        lo, hi = min(L[b, r] for r in rows), max(L[b, r] for r in rows)
        for r in rows:
            if math.isnan(s[b, r]):
                out[b, r] = math.nan
            elif hi == lo:
                out[b, r] = 0.0
            else:
                lam = 0.5 - (L[b, r] - lo) / (hi - lo)
                out[b, r] = lam if s[b, r] >= thr else min(0.0, lam)
    return out


def np_l1_exact(s, L, valid, n_gold, alpha=3e-4, thr=1.0):
    out = np.zeros(s.shape)
    for b, r in np.ndindex(s.shape):
        if valid[b, r]:
            out[b, r] = math.nan if math.isnan(s[b, r]) else float(s[b, r] >= thr) - alpha * abs(n_gold[b] - L[b, r])
    return out


def np_l1_max(s, L, valid, n_gold, alpha=0.01, delta=0.5, thr=1.0):
    out = np.zeros(s.shape)
    for b, r in np.ndindex(s.shape):
        if valid[b, r]:
            inner = min(max(alpha * (n_gold[b] - L[b, r]) + delta, 0.0), 1.0)
            out[b, r] = math.nan if math.isnan(s[b, r]) else float(s[b, r] >= thr) * inner
    return out


def np_shorter_better(s, L, valid, alpha=2.0, beta=0.001, thr=1.0):
    out = np.zeros(s.shape)
    for b in range(s.shape[0]):
        rows = [r for r in range(s.shape[1]) if valid[b, r]]
        if not rows:
            continue
        correct = [r for r in rows if s[b, r] >= thr]  # NaN >= thr is False
        sol = min(L[b, r] for r in correct) if correct else sum(L[b, r] for r in rows) / len(rows)
        for r in rows:
            c = float(s[b, r] >= thr)
            out[b, r] = math.nan if math.isnan(s[b, r]) else alpha * c - beta * abs(L[b, r] - sol)
    return out


def np_lead(s, L, valid, b_max, l_min=1.0, mode="symmetric", thr=1.0):
    out = np.zeros(s.shape)
    for b in range(s.shape[0]):
        correct = [L[b, r] for r in range(s.shape[1]) if valid[b, r] and s[b, r] >= thr]
        target = min(max(sum(correct) / len(correct), l_min), b_max) if correct else b_max
        for r in range(s.shape[1]):
            if not valid[b, r]:
                continue
            if math.isnan(s[b, r]):
                out[b, r] = math.nan
            elif mode == "symmetric":
                out[b, r] = max(-1.0, 1 - abs(L[b, r] - target) / target)
            elif s[b, r] >= thr:
                out[b, r] = max(0.0, 1 - L[b, r] / target)
            else:
                out[b, r] = min(max(1 - L[b, r] / target, -1.0), 0.0)
    return out


def np_o1(s, L, valid, ref_L, ref_A, lam=2.0, normalize="batch", eps=1e-6):
    raw = np.full(s.shape, math.nan)
    for b, r in np.ndindex(s.shape):
        if valid[b, r] and not math.isnan(s[b, r]):
            raw[b, r] = min(max(ref_L[b] / max(L[b, r], 1) - 1 + lam * (s[b, r] - ref_A[b]), -2.0), 4.0)
    out = raw.copy()
    if normalize == "batch":
        vals = raw[~np.isnan(raw)]
        out = (raw - vals.mean()) / (vals.std() + eps)
    elif normalize == "group":
        for b in range(s.shape[0]):
            vals = raw[b][~np.isnan(raw[b])]
            if len(vals):
                out[b] = (raw[b] - vals.mean()) / (vals.std() + eps)
    out[~valid] = 0.0
    return out


def np_count_between(tokens, lengths, open_id, close_id):
    out = np.zeros(lengths.shape, int)
    for b, r in np.ndindex(lengths.shape):
        row = list(tokens[b, r, : lengths[b, r]])
        if open_id not in row:
            continue
        start = row.index(open_id) + 1
        rest = row[start:]
        out[b, r] = rest.index(close_id) if close_id in rest else len(rest)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Random inputs


def random_batch(seed, B=4, R=6, with_nan=True):
    rng = np.random.default_rng(seed)
    L = rng.integers(1, 80, size=(B, R))
    s = rng.choice([0.0, 1.0, 1.0, 0.5], size=(B, R))
    L[0, -1] = 0  # a padding row (length 0)
    L[1, :2] = L[1, 2]  # ties in length
    if with_nan:
        s[2, 1] = np.nan  # one unscorable row
    n_gold = rng.integers(5, 70, size=B).astype(float)
    ref_L = rng.uniform(10, 70, size=B)
    ref_A = rng.uniform(0, 1, size=B)
    valid = L > 0
    inputs = rw.RewardInputs(scores_BR=s.astype(np.float32), lengths_BR=L.astype(np.int32), budgets_B=n_gold,
                             ref_lengths_B=ref_L, ref_accuracy_B=ref_A)
    return inputs, s, L, valid, n_gold, ref_L, ref_A


@functools.cache
def _jitted(name, cfg):  # one program per reward, config and shapes (eager ops would compile one by one)
    return jax.jit(lambda inputs: rw.get_reward(name)(inputs, cfg))


def run(name, inputs, **cfg):
    if name == "lead" and inputs.tokens_BRT is None:
        cfg.setdefault("max_target", 50.0)  # B_max; by default it is the rollout width T of tokens_BRT
    out = _jitted(name, rw.reward_config(name, **cfg))(inputs)
    assert out.shape == inputs.shape and out.dtype == np.float32
    return np.asarray(out)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=2e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the formulas


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_rewards_match_numpy(seed):
    inputs, s, L, valid, n_gold, ref_L, ref_A = random_batch(seed)
    close(run("correctness", inputs), np_correctness(s, L, valid))
    close(run("correctness", inputs, binary=True), np_correctness(s, L, valid, binary=True))
    close(run("dapo_overlong", inputs, max_length=60, cache_length=20), np_dapo(L, valid, 60, 20))
    close(run("kimi_length", inputs), np_kimi(s, L, valid))
    close(run("kimi_length", inputs, correct_threshold=0.5), np_kimi(s, L, valid, thr=0.5))
    close(run("l1_exact", inputs), np_l1_exact(s, L, valid, n_gold))
    close(run("l1_exact", inputs, alpha=0.02), np_l1_exact(s, L, valid, n_gold, alpha=0.02))
    close(run("l1_max", inputs), np_l1_max(s, L, valid, n_gold))
    close(run("l1_max", inputs, alpha=0.05, delta=0.2), np_l1_max(s, L, valid, n_gold, alpha=0.05, delta=0.2))
    close(run("shorter_better", inputs), np_shorter_better(s, L, valid))
    close(run("shorter_better", inputs, alpha=1.0, beta=0.01), np_shorter_better(s, L, valid, 1.0, 0.01))
    for normalize in ("batch", "group", "none"):
        close(run("o1_pruner", inputs, normalize=normalize), np_o1(s, L, valid, ref_L, ref_A, normalize=normalize))
    close(run("o1_pruner", inputs, lam=0.5), np_o1(s, L, valid, ref_L, ref_A, lam=0.5))
    for mode in ("symmetric", "asymmetric"):
        close(run("lead", inputs, max_target=50.0, mode=mode), np_lead(s, L, valid, 50.0, mode=mode))
    close(run("lead", inputs, max_target=90.0, min_target=40.0), np_lead(s, L, valid, 90.0, l_min=40.0))


def test_lead_budget_defaults_to_the_rollout_width():
    inputs, s, L, valid, *_ = random_batch(4)
    T = 33
    with_tokens = inputs.replace(tokens_BRT=np.zeros(s.shape + (T,), np.int32))
    close(run("lead", with_tokens), np_lead(s, L, valid, float(T)))
    with pytest.raises(ValueError, match="max_target"):
        rw.lead_reward(inputs, rw.LeadConfig())  # neither a budget nor tokens
    with pytest.raises(ValueError, match="min_target=40"):
        run("lead", with_tokens, min_target=40.0)  # L_min above B_max = T


def test_o1_pruner_reference_from_group():
    inputs, s, L, valid, *_ = random_batch(3)
    B = s.shape[0]
    ref_L = np.array([L[b][valid[b]].mean() for b in range(B)])
    ref_A = np.array([np.nanmean(np.where(valid[b], s[b], np.nan)) for b in range(B)])
    close(run("o1_pruner", inputs, ref_from_group=True), np_o1(s, L, valid, ref_L, ref_A))
    no_ref = rw.RewardInputs(scores_BR=inputs.scores_BR, lengths_BR=inputs.lengths_BR)
    with pytest.raises(ValueError, match="ref_lengths_B"):
        run("o1_pruner", no_ref)


def np_format(tokens, lengths, strict=True, stop_ids=(2,)):
    delims = (TOK.think_id, TOK.end_think_id, TOK.answer_id, TOK.end_answer_id)
    out = np.zeros(lengths.shape)
    for b, r in np.ndindex(lengths.shape):
        row = list(tokens[b, r, : lengths[b, r]])
        if any(row.count(d) != 1 for d in delims):
            continue
        p0, p1, p2, p3 = (row.index(d) for d in delims)
        tail = row[p3 + 1:]
        ok = p0 < p1 < p2 and p3 > p2 + 1 and (tail == [] or (len(tail) == 1 and tail[0] in stop_ids))
        if strict:
            ok = ok and p0 == 0 and p2 == p1 + 1
        out[b, r] = float(ok)
    return out


def random_completions(seed, B=4, R=8, T=24):
    """Rows that are well-formed, then randomly damaged (delimiters dropped, moved, duplicated, text appended)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((B, R, T), np.int64)
    lengths = np.zeros((B, R), np.int64)
    for b, r in np.ndindex(B, R):
        think = list(rng.integers(7, 20, size=rng.integers(0, 6)))
        answer = list(rng.integers(7, 20, size=rng.integers(0, 4)))
        row = [TOK.think_id, *think, TOK.end_think_id, TOK.answer_id, *answer, TOK.end_answer_id]
        row += [TOK.eos_id] if rng.random() < 0.7 else []
        for _ in range(rng.integers(0, 3)):
            i = int(rng.integers(len(row)))
            kind = rng.integers(4)
            if kind == 0:
                row.pop(i)
            elif kind == 1:
                row.insert(i, int(rng.integers(2, 20)))
            elif kind == 2:
                row.append(int(rng.integers(3, 20)))
        row = row[: T - 1]
        tokens[b, r, : len(row)] = row
        tokens[b, r, len(row):] = rng.integers(0, 20, size=T - len(row))  # junk past the length is ignored
        lengths[b, r] = len(row)
    return tokens, lengths


@pytest.mark.parametrize("seed", [0, 1])
def test_format_reward_and_count_between_match_numpy(seed):
    tokens, lengths = random_completions(seed)
    want_think = np_count_between(tokens, lengths, TOK.think_id, TOK.end_think_id)
    close(rw.count_between(tokens, lengths, TOK.think_id, TOK.end_think_id), want_think)
    inputs = rw.make_reward_inputs(np.ones(lengths.shape), tokens, lengths)
    close(inputs.think_lengths_BR, want_think)
    for strict in (True, False):
        want = np_format(tokens, lengths, strict=strict)
        assert 0 < want.mean() < 1  # both outcomes occur
        close(run("format", inputs, strict=strict), want)


# ---------------------------------------------------------------------------------------------------------------
# Edge cases


def test_dapo_overlong_boundaries():
    L_max, L_c = 20, 8
    lengths = np.array([[1, L_max - L_c, L_max - L_c + 1, L_max - 1, L_max, L_max + 1, 3 * L_max]])
    inputs = rw.RewardInputs(scores_BR=np.ones(lengths.shape, np.float32), lengths_BR=lengths)
    out = run("dapo_overlong", inputs, max_length=L_max, cache_length=L_c)
    close(out, [[0.0, 0.0, -1 / L_c, -(L_c - 1) / L_c, -1.0, -1.0, -1.0]])
    with pytest.raises(ValueError, match="cache_length"):
        rw.DapoOverlongConfig(max_length=4, cache_length=8)


def test_all_correct_and_all_wrong_groups():
    lengths = np.array([[10, 20, 30, 40], [10, 20, 30, 40], [7, 7, 7, 7]])
    scores = np.array([[1.0] * 4, [0.0] * 4, [1.0, 0.0, 1.0, 0.0]], np.float32)
    inputs = rw.RewardInputs(scores_BR=scores, lengths_BR=lengths, budgets_B=np.array([25.0, 25.0, 7.0]))
    kimi = run("kimi_length", inputs)
    close(kimi[0], [0.5, 0.5 - 1 / 3, 0.5 - 2 / 3, -0.5])  # all correct: λ itself
    close(kimi[1], [0.0, 0.0, 0.5 - 2 / 3, -0.5])  # all wrong: min(0, λ)
    close(kimi[2], [0.0] * 4)  # all lengths equal
    sb = run("shorter_better", inputs)
    close(sb[0], [2.0, 2.0 - 0.01, 2.0 - 0.02, 2.0 - 0.03])  # SOL = shortest correct = 10
    close(sb[1], [-0.015, -0.005, -0.005, -0.015])  # none correct: SOL = mean length = 25
    close(run("l1_max", inputs)[1], [0.0] * 4)  # wrong answers never earn the budget term
    close(run("correctness", inputs)[0], [1.0] * 4)


def test_padding_rows_are_excluded_from_group_statistics():
    lengths = np.array([[10, 20, 30, 0, 0]])
    scores = np.array([[1.0, 0.0, 1.0, 1.0, 1.0]], np.float32)
    base = rw.RewardInputs(scores_BR=scores[:, :3], lengths_BR=lengths[:, :3], budgets_B=np.array([15.0]),
                           ref_lengths_B=np.array([20.0]), ref_accuracy_B=np.array([0.5]))
    padded = rw.RewardInputs(scores_BR=scores, lengths_BR=lengths, budgets_B=np.array([15.0]),
                             ref_lengths_B=np.array([20.0]), ref_accuracy_B=np.array([0.5]))
    # an explicit mask excludes a row with a real length too
    masked = rw.RewardInputs(scores_BR=np.concatenate([scores[:, :3], [[1.0]]], 1).astype(np.float32),
                             lengths_BR=np.array([[10, 20, 30, 1]]), mask_BR=np.array([[True, True, True, False]]),
                             budgets_B=np.array([15.0]), ref_lengths_B=np.array([20.0]),
                             ref_accuracy_B=np.array([0.5]))
    for name in NAMES:
        if name == "format":
            continue
        want = run(name, base)
        for other in (padded, masked):
            got = run(name, other)
            close(got[:, :3], np.asarray(want, np.float64))
            assert np.all(got[:, 3:] == 0.0), name
    for normalize in ("batch", "group"):
        got = run("o1_pruner", padded, normalize=normalize)[0, :3]
        assert abs(got.mean()) < 1e-5 and abs(got.std() - 1.0) < 1e-3  # z-scored over the 3 real rows only


def test_nan_scores_pass_through_compute_rewards():
    inputs, s, L, valid, *_ = random_batch(4)
    terms = (rw.RewardTerm("correctness"), rw.RewardTerm("shorter_better", weight=0.5),
             rw.RewardTerm("dapo_overlong", rw.DapoOverlongConfig(60, 20)))
    total, parts = rw.compute_rewards(inputs, terms)
    total = np.asarray(total)
    assert total.shape == s.shape and total.dtype == np.float32
    assert np.isnan(total[2, 1]) and np.isnan(parts["correctness"][2, 1])
    assert not np.isnan(parts["dapo_overlong"][2, 1])  # a length-only reward does not need the score
    assert total[0, -1] == 0.0  # padding
    want = np_correctness(s, L, valid) + 0.5 * np_shorter_better(s, L, valid) + np_dapo(L, valid, 60, 20)
    close(total, want)


def test_compute_rewards_jits():
    inputs, *_ = random_batch(5)
    terms = (rw.RewardTerm("kimi_length"), rw.RewardTerm("l1_exact", weight=2.0), rw.RewardTerm("o1_pruner"))
    eager, _ = rw.compute_rewards(inputs, terms)
    jitted, _ = jax.jit(rw.compute_rewards, static_argnums=1)(inputs, terms)
    close(jitted, np.asarray(eager, np.float64))


# ---------------------------------------------------------------------------------------------------------------
# Tokens, not characters; thinking spans; format; host-side scoring


def test_lengths_and_thinking_spans_are_tokens_not_characters():
    task = Arithmetic(num_digits=(1, 1))
    problem = task.make(3, 4, "+")
    text = format_target(problem)  # "<think>3+4+0=07</think><answer>7</answer>"
    ids = TOK.encode(text, add_eos=True)
    n_think = len(problem.cot)
    assert len(ids) == n_think + 1 + 1 + 1 + 1 + 1 + 1 < len(text)  # delimiters and eos are one token each
    T = len(ids) + 4
    tokens = np.zeros((1, 2, T), np.int32)
    tokens[0, 0, : len(ids)] = ids
    tokens[0, 1, : len(ids)] = ids
    lengths = np.array([[len(ids), len(ids)]])
    inputs = rw.make_reward_inputs(np.ones((1, 2)), tokens, lengths)
    assert np.all(np.asarray(inputs.think_lengths_BR) == n_think)
    # a budget that the token count meets but the character count (len(text) + 5 for "<eos>") would blow
    out = run("dapo_overlong", inputs, max_length=len(ids) + 4, cache_length=4)  # |y| = L_max − L_c
    assert np.all(out == 0.0) and len(text) + 5 > len(ids) + 4
    close(run("l1_exact", rw.make_reward_inputs(np.ones((1, 2)), tokens, lengths, budgets_B=[len(ids)])), [[1, 1]])
    think = rw.make_reward_inputs(np.ones((1, 2)), tokens, lengths, budgets_B=[n_think])
    close(run("l1_max", think, length="think"), [[0.5, 0.5]])  # n_y = n_gold exactly → δ
    plain = rw.RewardInputs(scores_BR=np.ones((1, 2), np.float32), lengths_BR=lengths, budgets_B=[n_think])
    with pytest.raises(ValueError, match="think_lengths_BR"):
        run("l1_max", plain, length="think")


def test_format_reward_on_real_completions():
    problem = Arithmetic(num_digits=(1, 1)).make(3, 4, "+")
    good = format_target(problem)
    cases = {
        good: 1.0,
        format_target(problem, cot=False): 1.0,  # empty think block is still the format
        "<think>3+4</think><answer></answer>": 0.0,  # empty answer
        "<think>3+4</think>x<answer>7</answer>": 0.0,  # gap (strict)
        "<answer>7</answer>": 0.0,  # no think block
        "<think>3+4<answer>7</answer>": 0.0,  # think never closed
        good + "<answer>8</answer>": 0.0,  # two answers
        good[:-3]: 0.0,  # truncated mid-tag... a broken closing delimiter is plain text
    }
    rows = [TOK.encode(text, add_eos=True) for text in cases]
    rows.append(TOK.encode(good)[:-1] + [TOK.end_answer_id] + TOK.encode("junk"))  # trailing text after answer
    want = [*cases.values(), 0.0]
    T = max(map(len, rows)) + 3
    tokens = np.zeros((len(rows), 1, T), np.int32)
    for i, row in enumerate(rows):
        tokens[i, 0, : len(row)] = row
    lengths = np.array([[len(row)] for row in rows])
    inputs = rw.make_reward_inputs(np.ones(lengths.shape), tokens, lengths)
    close(run("format", inputs)[:, 0], want)
    gap = TOK.encode("<think>3+4</think>\n<answer>7</answer>", add_eos=True)
    loose = rw.make_reward_inputs(np.ones((1, 1)), np.array([[gap]]), np.array([[len(gap)]]))
    assert run("format", loose)[0, 0] == 0.0 and run("format", loose, strict=False)[0, 0] == 1.0


def test_score_completions_from_tokens():
    task = Arithmetic(num_digits=(1, 1))
    problems = [task.make(3, 4, "+"), task.make(2, 2, "+")]
    texts = [[format_target(problems[0]), "<think></think><answer>8</answer>"],
             ["<think></think><answer>4</answer>", "no answer"]]
    ids = [[TOK.encode(t, add_eos=True) for t in group] for group in texts]
    T = max(len(i) for group in ids for i in group)
    tokens = np.zeros((2, 2, T), np.int32)
    lengths = np.zeros((2, 2), np.int32)
    for b, r in np.ndindex(2, 2):
        tokens[b, r, : len(ids[b][r])] = ids[b][r]
        lengths[b, r] = len(ids[b][r])
    completions = rw.decode_completions(TOK, tokens, lengths)
    assert completions[0][0] == texts[0][0] + "<eos>"
    scores = rw.score_completions(task, problems, completions)
    assert scores.dtype == np.float32 and scores.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    masked = rw.score_completions(task, problems, completions, mask_BR=[[True, False], [True, True]])
    assert masked.tolist() == [[1.0, 0.0], [1.0, 0.0]]

    class Broken:
        name = "broken"

        def __init__(self, value):
            self.value = value

        def score(self, problem, completion):
            if self.value is None:
                raise RuntimeError("verifier crashed")
            return self.value

    with pytest.raises(RuntimeError):
        rw.score_completions(Broken(None), problems, completions)
    assert np.isnan(rw.score_completions(Broken(None), problems, completions, on_error="nan")).all()
    with pytest.raises(ValueError, match="1.5"):
        rw.score_completions(Broken(1.5), problems, completions)


# ---------------------------------------------------------------------------------------------------------------
# Registry and errors


def test_registry_lists_every_reward():
    assert rw.available_rewards() == tuple(sorted(NAMES))
    for name in NAMES:
        fn = rw.get_reward(name)
        assert fn.reward_name == name and fn.config_cls is type(rw.reward_config(name))
        if name not in ("correctness", "format"):  # the paper-derived ones cite the spec sheet
            assert "ALGORITHMS" in fn.config_cls.__doc__
        cfg = rw.reward_config(name)
        hash(cfg)  # frozen: usable as a static jit argument
    with pytest.raises(ValueError, match="already registered"):
        rw.register_reward("kimi_length", rw.KimiLengthConfig)(lambda inputs, config: None)


def test_unknown_reward_lists_registered_names():
    with pytest.raises(ValueError, match="unknown reward 'lengthy'") as err:
        rw.get_reward("lengthy")
    assert all(name in str(err.value) for name in NAMES)
    inputs, *_ = random_batch(0)
    with pytest.raises(ValueError, match="shorter_better"):
        rw.compute_rewards(inputs, ["nope"])


def test_wrong_shape_reward_is_a_clear_error():
    name = "_test_wrong_shape"
    rw.register_reward(name, rw.CorrectnessConfig)(lambda inputs, config: inputs.scores_BR.reshape(-1))
    try:
        inputs, *_ = random_batch(0)
        with pytest.raises(ValueError, match=r"reward '_test_wrong_shape' returned shape \(24,\), expected .*4, 6"):
            rw.compute_rewards(inputs, [name])
    finally:
        del rw._REWARDS[name], rw._CONFIGS[name]


def test_bad_inputs_are_clear_errors():
    inputs, *_ = random_batch(0)
    bad = rw.RewardInputs(scores_BR=inputs.scores_BR, lengths_BR=inputs.lengths_BR, budgets_B=np.ones(3))
    with pytest.raises(ValueError, match=r"budgets_B has shape \(3,\), expected \(4,\)"):
        rw.compute_rewards(bad, ["l1_exact"])
    no_budget = rw.RewardInputs(scores_BR=inputs.scores_BR, lengths_BR=inputs.lengths_BR)
    with pytest.raises(ValueError, match="budgets_B"):
        rw.compute_rewards(no_budget, ["l1_max"])
    with pytest.raises(TypeError, match="KimiLengthConfig"):
        rw.compute_rewards(inputs, [rw.RewardTerm("kimi_length", rw.L1MaxConfig())])
    with pytest.raises(ValueError, match="label"):
        rw.compute_rewards(inputs, ["kimi_length", "kimi_length"])
