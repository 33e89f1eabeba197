"""TreePO segment-tree rollouts: shared prefixes, gathered state rows (sampler log-probs = teacher-forced forward,
attention and SSM), one prefill and fewer decoded rows, early-stop reallocation, ids fit treepo_advantages,
equivalence with generate when nothing branches, bad input."""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.decoding import Greedy, Sampler, cost, generate
from lmx.train import rl, treepo
from lmx.train.treepo import TreeConfig, tree_rollout

PROMPTS = [[5, 9, 17], [42], [3, 1, 4, 1, 5]]
STOPS = range(0, 128, 4)  # a quarter of the vocabulary: branches finish early, some in the first segment
TAU = 0.8
CFG = TreeConfig(segment_len=2, branching=(2, 2, 2), max_new_tokens=8)  # branch points after 2 and 4 tokens
# This seed's tree: prompts 0 and 1 reallocate slots of finished nodes; then all of prompt 0's depth-1 nodes stop
# before the second branch point, and both of prompt 2's depth-0 nodes stop before the first (duplicates).
SEED = 6


@pytest.fixture(scope="module")
def llama_tree(tiny):
    """The main rollout, traced afresh with prefill / decode_step wrapped to record how many rows each runs."""
    model, params = tiny("llama-tiny", num_layers=1)
    rows = {"prefill": [], "decode": []}
    g = importlib.import_module("lmx.decoding.generate")  # the module (the package attribute is the function)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(treepo, "prefill", lambda m, p, t, n, s: rows["prefill"].append(len(t)) or g.prefill(m, p, t, n, s))
        mp.setattr(treepo, "decode_step", lambda m, p, t, s: rows["decode"].append(len(t)) or g.decode_step(m, p, t, s))
        treepo._compiled.cache_clear()
        out = tree_rollout(model, params, PROMPTS, cfg=CFG, sampler=Sampler(TAU), rng=jax.random.key(SEED),
                           stop_tokens=STOPS)
        jax.block_until_ready(out)
    treepo._compiled.cache_clear()  # the wrapped trace must not be reused
    return model, params, jax.device_get(out), rows


def _np(out):
    gen, ids, valid = out
    return (np.asarray(gen.tokens_BRT), np.asarray(gen.logprobs_BRT), np.asarray(gen.lengths_BR),
            np.asarray(gen.finished_BR), np.asarray(ids), np.asarray(valid))


def _node(ids_RD, k):
    """Each leaf's node in phase k (between branch points k and k+1): its ancestor id, or the leaf at the end."""
    return ids_RD[:, k] if k < ids_RD.shape[1] else np.arange(ids_RD.shape[0])


def test_leaves_with_equal_ids_share_their_prefix_and_siblings_diverge(llama_tree):
    tokens, logprobs, lengths, _, ids, _ = _np(llama_tree[2])
    B, G, D = ids.shape
    L = CFG.segment_len
    assert (B, G, D) == (3, 8, 2) and ids.dtype == np.int32
    diverged = 0
    for b, d in itertools.product(range(B), range(1, D + 1)):
        n = d * L
        for i, j in itertools.combinations(range(G), 2):
            if ids[b, i, d - 1] == ids[b, j, d - 1]:
                np.testing.assert_array_equal(tokens[b, i, :n], tokens[b, j, :n])
                np.testing.assert_array_equal(logprobs[b, i, :n], logprobs[b, j, :n])  # copied, not resampled
                if d > 1:
                    assert ids[b, i, d - 2] == ids[b, j, d - 2]  # subgroups nest
                reached = lengths[b, i] > n and lengths[b, j] > n  # both branched at this point
                if reached and _node(ids[b], d)[i] != _node(ids[b], d)[j]:  # siblings: they sample on apart
                    assert (tokens[b, i, n:] != tokens[b, j, n:]).any()
                    diverged += 1
            elif lengths[b, i] > n and lengths[b, j] > n:  # different nodes reached this point: different prefixes
                assert (tokens[b, i, :n] != tokens[b, j, :n]).any()
    assert diverged >= 10  # precondition: many sibling pairs checked


def _teacher_forced(model, params, prompts, tokens_BRT, temperature):
    """log softmax(logits / τ)[token] of every leaf token by one full forward over prompt + leaf (no cache)."""
    B, R, T = tokens_BRT.shape
    P = max(map(len, prompts))
    seqs = np.zeros((B, R, P + T), np.int32)
    for b, p in enumerate(prompts):
        seqs[b, :, : len(p)] = p
        seqs[b, :, len(p): len(p) + T] = tokens_BRT[b]
    logits = jax.jit(lambda t: model.apply({"params": params}, t).logits_BTV)(seqs.reshape(B * R, -1))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)).reshape(B, R, P + T, -1)
    want = np.zeros((B, R, T), np.float32)
    for b, p in enumerate(prompts):
        pos = len(p) - 1 + np.arange(T)
        want[b] = np.take_along_axis(logp[b][:, pos], tokens_BRT[b][..., None], axis=-1)[..., 0]
    return want


def _check_logprobs(model, params, out, untempered_differs=True):
    tokens, logprobs, lengths, _, _, _ = _np(out)
    mask = np.arange(tokens.shape[-1]) < lengths[..., None]
    want = _teacher_forced(model, params, PROMPTS, tokens, TAU)
    np.testing.assert_allclose(np.where(mask, logprobs, 0), np.where(mask, want, 0), atol=1e-5)
    assert (logprobs[~mask] == 0).all() and (tokens[~mask] == 0).all()
    if untempered_differs:  # τ matters: log-probs at τ = 1 would fail the check above
        assert not np.allclose(np.where(mask, _teacher_forced(model, params, PROMPTS, tokens, 1.0), 0),
                               np.where(mask, want, 0), atol=1e-3)


def test_sampler_logprobs_equal_a_teacher_forced_forward(llama_tree):
    model, params, out, _ = llama_tree
    assert int(out[0].stats["reallocated_slots"]) > 0  # gathers under reallocation are covered too
    _check_logprobs(model, params, out)


def test_mamba2_state_rows_are_gathered(tiny):
    """Mamba-2 layers carry their state in conv / SSM rings: a child decoding from anything but its parent's rows
    would give log-probs that a teacher-forced forward does not reproduce."""
    model, params = tiny("mamba2-tiny", num_layers=1)
    out = tree_rollout(model, params, PROMPTS, cfg=TreeConfig(2, (2, 2), 6), sampler=Sampler(TAU),
                       rng=jax.random.key(1), stop_tokens=STOPS)
    assert int(out[0].stats["reallocated_slots"]) > 0
    _check_logprobs(model, params, jax.device_get(out), untempered_differs=False)


def test_one_prefill_and_the_tree_decodes_each_shared_prefix_once(llama_tree):
    model, _, out, rows = llama_tree
    tokens, _, lengths, finished, ids, valid = _np(out)
    s = {k: np.asarray(v) for k, v in out[0].stats.items()}
    B, G, D = ids.shape
    assert rows["prefill"] == [B]  # B prompt rows, not B·G
    assert sorted(set(rows["decode"])) == [B * n for n in CFG.nodes]  # 6, 12, 24 rows: early segments are cheaper
    # Fed positions: leaf token t (t < length − 1) is fed by its node of phase min(t // L, D), once per node.
    fed = {(b, k, int(_node(ids[b], k)[i]), t) for b in range(B) for i in range(G)
           for t in range(lengths[b, i] - 1) for k in [min(t // CFG.segment_len, D)]}
    assert int(s["decoded_rows_tokens"]) == len(fed) < int(s["independent_rows_tokens"]) == (lengths - 1).sum()
    prompt = np.array([len(p) for p in PROMPTS])
    want_flops = (sum(float(cost.forward_flops(model.cfg, 0, n)) for n in prompt)
                  + sum(float(cost.forward_flops(model.cfg, prompt[b] + t, prompt[b] + t + 1)) for b, _, _, t in fed))
    np.testing.assert_allclose(s["flops"], want_flops, rtol=1e-5)
    assert int(s["model_calls"]) == 1 + int(s["decode_steps"]) == lengths.max() == CFG.max_new_tokens
    assert int(s["tokens_generated"]) == lengths.sum() and int(s["prompt_tokens"]) == prompt.sum()
    assert int(s["tree_leaves"]) == G == 8 and int(s["invalid_leaves"]) == (~valid).sum() > 0
    assert int(s["overflow"]) == 0 and set(s) >= {"kv_bytes", "ssm_state_bytes", "state_bytes", "flops_per_token"}


def test_finished_branches_give_their_slots_to_unfinished_ones(llama_tree):
    tokens, _, lengths, finished, ids, valid = _np(llama_tree[2])
    B, G, D = ids.shape
    L, nodes = CFG.segment_len, CFG.nodes
    moved, seen = 0, {"reallocated": 0, "all_finished": 0}
    for b, d in itertools.product(range(B), range(1, D + 1)):
        parent, child = ids[b, :, d - 1], _node(ids[b], d)
        assert set(parent) == set(range(nodes[d - 1])) and len(set(zip(parent, child, strict=True))) == nodes[d]
        done = finished[b] & (lengths[b] <= d * L)  # the leaf's node at branch point d had already stopped
        fin = {int(p): bool(done[parent == p].all()) for p in set(parent)}
        assert all(done[parent == p].all() == done[parent == p].any() for p in fin)  # one node, one status
        kids = {p: len(set(child[parent == p])) for p in fin}
        open_ = [p for p in sorted(fin) if not fin[p]]
        if open_:
            assert all(kids[p] == 1 for p in fin if fin[p])  # a finished node is not expanded
            share = [kids[p] for p in open_]
            free = nodes[d] - (len(fin) - len(open_))
            assert sum(share) == free and share == sorted(share, reverse=True) and share[0] - share[-1] <= 1
            assert min(share) >= CFG.branching[d]
            moved += (len(fin) - len(open_)) * (CFG.branching[d] - 1)
            seen["reallocated"] += len(open_) < len(fin)
        else:  # every branch stopped: b_d copies per parent, one valid
            assert all(kids[p] == CFG.branching[d] for p in fin)
            for p in fin:
                group = parent == p
                assert valid[b][group].sum() == valid[b][group].any()
                assert (tokens[b][group] == tokens[b][group][0]).all()
            seen["all_finished"] += 1
    assert seen["reallocated"] >= 2 and seen["all_finished"] >= 3  # preconditions of this seed
    assert int(llama_tree[2][0].stats["reallocated_slots"]) == moved > 0
    assert valid.sum(-1).tolist() == [4, 8, 2]  # one valid leaf per node that stopped: 4 at depth 1, 2 at depth 0


def _treepo_np(r_BR, tokens, lengths, valid, L, D, whiten, eps=1e-6):
    """TreePO's advantage from the tree itself: leaf j is in leaf i's depth-d subgroup when both branched at
    d·L tokens with the same prefix (a leaf that stopped before is alone); depth 0 is the whole group."""
    B, G = r_BR.shape
    adv = np.zeros((B, G))
    keep = np.zeros((B, G), bool)
    for b in range(B):
        ok = valid[b]
        if r_BR[b, ok].max() == r_BR[b, ok].min():
            continue
        for i in np.flatnonzero(ok):
            terms = [r_BR[b, i] - r_BR[b, ok].mean()]
            for d in range(1, D + 1):
                n = d * L
                if lengths[b, i] <= n:
                    continue
                members = [j for j in np.flatnonzero(ok)
                           if lengths[b, j] > n and (tokens[b, j, :n] == tokens[b, i, :n]).all()]
                if len(members) > 1:
                    terms.append(r_BR[b, i] - r_BR[b, members].mean())
            adv[b, i], keep[b, i] = np.mean(terms), True
    if whiten:
        v = adv[keep]
        adv[keep] = (v - v.mean()) / (v.std(ddof=1) + eps)
    return adv


def test_rollout_ids_and_valid_give_treepo_advantages(llama_tree):
    gen, ids, valid = llama_tree[2]
    tokens, _, lengths, _, _, valid_np = _np(llama_tree[2])
    r_BR = np.random.default_rng(0).uniform(0, 1, lengths.shape).astype(np.float32)
    advantages = jax.jit(rl.treepo_advantages, static_argnames="config")  # one compile instead of op-by-op
    for whiten in (False, True):
        cfg = rl.TreePOConfig(whiten=whiten)
        adv, _ = advantages(jnp.asarray(r_BR), config=cfg, subgroup_ids=ids, valid=valid)
        want = _treepo_np(r_BR.astype(np.float64), tokens, lengths, valid_np, CFG.segment_len, CFG.depths, whiten)
        np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
        assert (np.asarray(adv)[~valid_np] == 0).all()
        # the duplicates must be excluded: counting them shifts their groups' means
        unmasked, _ = advantages(jnp.asarray(r_BR), config=cfg, subgroup_ids=ids)
        assert not np.allclose(np.asarray(unmasked)[valid_np], want[valid_np], atol=1e-3)


def test_a_tree_that_never_branches_is_generate(tiny):
    """branching (2, 1): one branch point with fan-out 1 — the same rows, keys and calls as generate(R=2)."""
    model, params = tiny("llama-tiny", num_layers=1)
    kw = dict(sampler=Sampler(TAU), rng=jax.random.key(2), stop_tokens=STOPS)
    want = generate(model, params, PROMPTS, max_new_tokens=6, num_samples=2, **kw)
    got, ids, valid = tree_rollout(model, params, PROMPTS, cfg=TreeConfig(3, (2, 1), 6), **kw)
    for name in ("tokens_BRT", "lengths_BR", "finished_BR"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_allclose(got.logprobs_BRT, want.logprobs_BRT, atol=1e-6)  # two programs: fusion may differ
    assert np.asarray(want.lengths_BR).max() > 3  # decoding went past the branch point
    for k, v in want.stats.items():
        np.testing.assert_allclose(got.stats[k], v, rtol=1e-6, err_msg=k)
    assert int(got.stats["decoded_rows_tokens"]) == int(got.stats["independent_rows_tokens"])
    np.testing.assert_array_equal(ids[..., 0], np.broadcast_to(np.arange(2), (3, 2)))
    assert np.asarray(valid).all() and int(got.stats["reallocated_slots"]) == 0


@pytest.mark.parametrize("kw, match", [
    (dict(segment_len=0), r"TreeConfig.segment_len=0 must be an int >= 1"),
    (dict(branching=(2, 0)), r"TreeConfig.branching\[1\]=0 must be an int >= 1"),
    (dict(branching=()), r"TreeConfig.branching=\(\) must be a non-empty tuple"),
    (dict(branching=(1, 1)), r"G=1 leaf per prompt"),
    (dict(max_new_tokens=0), r"TreeConfig.max_new_tokens=0 must be an int >= 1"),
    (dict(segment_len=4, max_new_tokens=8), r"D·L = 2·4 = 8 tokens, must lie inside max_new_tokens=8"),
])
def test_bad_tree_config_fails_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        TreeConfig(**(dict(segment_len=2, branching=(2, 2, 2), max_new_tokens=8) | kw))


@pytest.mark.parametrize("kw, match", [
    (dict(sampler=Greedy()), r"Greedy\(\) would make all G=8 leaves identical"),
    (dict(rng=None), r"rng is required"),
    (dict(max_len=12), r"prompt 2 has 5 tokens.*max_len=12"),
    (dict(stop_tokens=[128]), r"stop_tokens contain ids \[128\]"),
])
def test_bad_rollout_input_fails_early(tiny, kw, match):
    model, params = tiny("llama-tiny", num_layers=1)
    kw = dict(cfg=CFG, sampler=Sampler(), rng=jax.random.key(0)) | kw
    with pytest.raises(ValueError, match=match):
        tree_rollout(model, params, PROMPTS, **kw)
    with pytest.raises(TypeError, match="cfg must be a TreeConfig"):
        tree_rollout(model, params, PROMPTS, cfg=(2, (2, 2), 8), sampler=Sampler(), rng=jax.random.key(0))
