"""TreePO segment-tree rollouts (arXiv 2508.17445) as one jitted program.

Each prompt is prefilled once and copied to b_0 rows (the tree's root fan-out, depth 0). Rows decode segments of
L tokens; at branch point d (after d segments, d = 1..D) every node's decode-state and Record rows are gathered into
its children with `select` (the shared prefix is never recomputed), and the children sample on independently.
After the last branch point the leaves decode to the budget or a stop token.

Phases between branch points are separate `lax.while_loop`s over a static number of rows X_d = B·N_d (N_d = Π
b_0..b_d nodes per prompt), so early segments decode fewer rows than G = N_D independent samples would. Rows of a
phase are ordered b·N_d + n (prompt-major, like `lmx.models.repeat`). Before each branch point the parents' next
token logits are already computed (a phase's loop body is sample → decode), so the children share that call too
and only sample from it with their own keys.

Early stop (the paper's): a node that has emitted a stop token is not forked. At a branch point of fan-out b it
keeps one slot (its finished leaf rides along), and the slots it frees go to the unfinished nodes of the same
prompt, spread evenly (the first ones in row order take the remainder), so each of those gets ≥ b children.
Only when every node of a prompt has finished are duplicates unavoidable: each parent then gets b copies of
itself, the first valid and the others marked invalid (`valid_BR`), to be excluded from advantages and losses.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmx.decoding import cost
from lmx.decoding.generate import (
    AllFinished,
    Generation,
    Record,
    _int_at_least,
    base_stats,
    decode_step,
    gather_rows,
    prefill,
    prepare,
    to_generation,
)
from lmx.decoding.sampling import Sampler, sample, token_logprobs
from lmx.models.lm import decode_params
from lmx.models.state import init_state, repeat, select


@dataclass(frozen=True)
class TreeConfig:
    """TreePO's segment tree (arXiv 2508.17445).

    segment_len: L, tokens per segment; branch points sit at token counts d·L, d = 1..D.
    branching: (b_0, b_1, ..., b_D), the fan-out per depth (the paper's divergence, here fixed per depth; its dynamic
      divergence and fallback heuristics are not implemented): b_0 copies of each prompt share one prefill; at branch
      point d every unfinished node forks into b_d children. G = Π b_d leaves per prompt.
    max_new_tokens: each leaf's token budget; after the last branch point (D·L tokens) leaves decode up to it or to
      a stop token. D·L < max_new_tokens, so every child samples at least one token of its own.
    Leaves with equal `subgroup_ids[..., d-1]` share their first d·L tokens (the subgroups of TreePO's advantage).
    """

    segment_len: int
    branching: tuple[int, ...]
    max_new_tokens: int

    def __post_init__(self):
        _int_at_least("TreeConfig.segment_len", self.segment_len, 1)
        _int_at_least("TreeConfig.max_new_tokens", self.max_new_tokens, 1)
        if isinstance(self.branching, (str, bytes)) or not np.iterable(self.branching) or not len(self.branching):
            raise ValueError(f"TreeConfig.branching={self.branching!r} must be a non-empty tuple of ints >= 1")
        object.__setattr__(self, "branching", tuple(self.branching))  # a list is accepted; kept hashable
        for d, b in enumerate(self.branching):
            _int_at_least(f"TreeConfig.branching[{d}]", b, 1)
        if self.num_leaves < 2:
            raise ValueError(f"TreeConfig.branching={self.branching} gives G={self.num_leaves} leaf per prompt; a "
                             "tree (and TreePO's group advantage) needs G >= 2")
        if self.depths * self.segment_len >= self.max_new_tokens:
            raise ValueError(f"TreeConfig: the last branch point, after D·L = {self.depths}·{self.segment_len} = "
                             f"{self.depths * self.segment_len} tokens, must lie inside max_new_tokens="
                             f"{self.max_new_tokens} (each leaf needs a token of its own)")

    @property
    def depths(self) -> int:
        """D: branch points after depth 0 (the depth axis of subgroup_ids)."""
        return len(self.branching) - 1

    @property
    def num_leaves(self) -> int:
        """G = Π branching: leaves (rollouts) per prompt."""
        return math.prod(self.branching)

    @property
    def nodes(self) -> tuple[int, ...]:
        """N_d = Π branching[:d+1]: nodes per prompt decoding in phase d (between branch points d and d+1)."""
        return tuple(math.prod(self.branching[: d + 1]) for d in range(len(self.branching)))


class TreeRollout(NamedTuple):
    """What `tree_rollout` returns (unpacks as a 3-tuple)."""

    generation: Generation  # R = G leaves per prompt, in the layout of lmx.decoding.generate
    subgroup_ids_BRd: jax.Array  # int32 [B, G, D]: [..., d-1] = the leaf's ancestor node (index within its prompt)
    # at phase d-1, so equal ids at depth d mean a shared prefix of d·L tokens: `treepo_advantages(subgroup_ids=)`
    valid_BR: jax.Array  # bool: False only for a duplicate leaf (every branch of its prompt finished before a
    # branch point); pass it to treepo_advantages(valid=) and drop it from the loss mask


def tree_rollout(model, params, prompts, *, cfg: TreeConfig, sampler: Sampler, rng, stop_tokens=(), pad_id: int = 0,
                 max_len: int | None = None) -> TreeRollout:
    """Sample a TreePO segment tree of G = cfg.num_leaves leaves per prompt (see the module docstring).

    prompts, stop_tokens, pad_id, max_len: as in `lmx.decoding.generate`; rng: per-step keys fold_in(rng, step)
    (token index), each row drawing its own sample. stats: the base_stats keys (tokens_generated counts every leaf,
    shared prefixes included; flops each prompt once and each tree node's positions once) plus
      decoded_rows_tokens: row-positions the decode calls ran on for live rows (each shared prefix once);
      independent_rows_tokens: the same for G independent samples of these lengths, Σ_leaves (length − 1);
      tree_leaves: G; reallocated_slots: child slots finished nodes handed to unfinished ones;
      invalid_leaves: duplicate leaves (valid_BR False).
    One jit call, cached on (model, sampler, stop tokens, cfg, max_len, pad_id) and the padded prompt shape.
    """
    if not isinstance(cfg, TreeConfig):
        raise TypeError(f"cfg must be a TreeConfig, got {cfg!r}")
    p = prepare(model.cfg, prompts, max_new_tokens=cfg.max_new_tokens, sampler=sampler, stop_tokens=stop_tokens,
                rng=rng, num_samples=cfg.num_leaves, stop_when=AllFinished(), max_len=max_len, pad_id=pad_id)
    if sampler.is_greedy:
        raise ValueError(f"tree rollouts branch by sampling; {sampler} would make all G={cfg.num_leaves} leaves "
                         "identical")
    fn = _compiled(model, sampler, p.stop_tokens, cfg, p.max_len, p.pad_id)
    return fn(decode_params(model, params), p.tokens_BT, p.lengths_B, rng)


def _allocate(finished_BR, children: int, b: int):
    """One branch point's children, R = nodes per prompt (parents in `finished_BR`, `children` after it):
    (parent_BR, first_BR), child slot j of prompt b copies that prompt's node parent_BR[b, j]; first_BR marks each
    parent's first child. Finished parents keep 1 slot, the unfinished share the rest evenly (contiguous, in parent
    order, the first ones taking the remainder); with no unfinished parent every parent gets b slots (duplicates)."""
    open_BR = ~finished_BR
    u_B1 = open_BR.sum(1, keepdims=True, dtype=jnp.int32)
    free_B1 = children - (finished_BR.shape[1] - u_B1)  # slots left once each finished parent keeps one
    rank_BR, u1 = jnp.cumsum(open_BR, 1) - 1, jnp.maximum(u_B1, 1)
    counts_BR = jnp.where(finished_BR, 1, free_B1 // u1 + (rank_BR < free_B1 % u1))
    counts_BR = jnp.where(u_B1 == 0, b, counts_BR)
    ends_BR, slot_R = jnp.cumsum(counts_BR, 1), jnp.arange(children)
    parent_BR = jnp.sum(ends_BR[:, None, :] <= slot_R[None, :, None], -1, dtype=jnp.int32)  # first end past j
    return parent_BR, jnp.take_along_axis(ends_BR - counts_BR, parent_BR, axis=1) == slot_R[None]




@functools.lru_cache(maxsize=32)
def _compiled(model, sampler, stop_tokens, tree: TreeConfig, max_len: int, pad_id: int):
    mcfg, L, T, D = model.cfg, tree.segment_len, tree.max_new_tokens, tree.depths
    stop_S = np.array(stop_tokens, np.int32)

    def sample_into(record: Record, logits_XV, key):
        tok_X = sample(sampler, logits_XV, key)
        record, _ = record.append(tok_X[:, None], token_logprobs(sampler, logits_XV, tok_X)[:, None],
                                  jnp.ones_like(tok_X), stop_S, pad_id)
        return record, tok_X

    def run(params, tokens_BT, lengths_B, rng):
        B = tokens_BT.shape[0]
        logits_BV, state = prefill(model, params, tokens_BT, lengths_B,
                                   init_state(mcfg, B, max_len, rollback_window=0))  # no rollback ever: 1 SSM slot
        b0 = tree.branching[0]
        state, logits_XV = repeat(state, b0), jnp.repeat(logits_BV, b0, axis=0)
        record = Record.empty(B * b0, T, pad_id)
        ids_Xd, valid_X = jnp.zeros((B * b0, D), jnp.int32), jnp.ones((B * b0,), bool)
        step, calls = jnp.int32(0), jnp.int32(0)  # step: index of the token sampled next (its key)
        rows_tokens, flops, moved = jnp.int32(0), jnp.sum(cost.forward_flops(mcfg, 0, lengths_B)), jnp.int32(0)
        read = jnp.sum(cost.state_bytes_read(mcfg, 0, lengths_B))

        for d, N in enumerate(tree.nodes):
            if d < D:  # sample → decode until every live row holds (d+1)·L tokens; its next logits are then ready
                def body(c):
                    step, calls, state, logits_XV, record = c
                    record, tok_X = sample_into(record, logits_XV, jax.random.fold_in(rng, step))
                    # Finished rows are fed too (static shapes); `append` ignores what they sample. The last
                    # iteration's call is wasted only if every row of the batch has just stopped.
                    logits_XV, state = decode_step(model, params, tok_X, state)
                    return step + 1, calls + 1, state, logits_XV, record

                bound = (d + 1) * L
                cond = lambda c, bound=bound: jnp.any(c[4].alive() & (c[4].lengths_X < bound))
                step, calls, state, logits_XV, record = jax.lax.while_loop(
                    cond, body, (step, calls, state, logits_XV, record))
            else:  # the leaves: as generate, sample, then decode → sample until all finish or the budget is spent
                record, tok_X = sample_into(record, logits_XV, jax.random.fold_in(rng, step))

                def body(c):
                    step, calls, state, tok_X, record = c
                    logits_XV, state = decode_step(model, params, tok_X, state)
                    record, tok_X = sample_into(record, logits_XV, jax.random.fold_in(rng, step))
                    return step + 1, calls + 1, state, tok_X, record

                step, calls, state, _, record = jax.lax.while_loop(
                    lambda c: jnp.any(c[4].alive()), body, (step + 1, calls, state, tok_X, record))

            # Positions this phase's nodes fed for themselves: tokens d·L .. of their own segment; a row's last
            # token is fed only when it will branch on (unfinished before the last phase).
            prompt_X = jnp.repeat(lengths_B, N)
            fed_X = record.lengths_X - (record.finished_X | (d == D)).astype(jnp.int32)
            n_X = jnp.maximum(fed_X - d * L, 0)
            rows_tokens += jnp.sum(n_X)
            flops += jnp.sum(cost.forward_flops(mcfg, prompt_X + d * L, prompt_X + d * L + n_X))
            read += jnp.sum(cost.state_bytes_read(mcfg, prompt_X + d * L, prompt_X + d * L + n_X))
            if d == D:
                break

            # Branch point d+1: copy every parent's state, logits, record, ids and validity into its children.
            finished_BR = record.finished_X.reshape(B, N)
            parent_BR, first_BR = _allocate(finished_BR, tree.nodes[d + 1], tree.branching[d + 1])
            moved += jnp.sum(jnp.where(jnp.all(finished_BR, 1, keepdims=True), 0, finished_BR)
                             ) * (tree.branching[d + 1] - 1)
            idx_X = (jnp.arange(B)[:, None] * N + parent_BR).reshape(-1)
            valid_X = gather_rows(valid_X, idx_X) & (~gather_rows(record.finished_X, idx_X) | first_BR.reshape(-1))
            state = select(state, idx_X)
            logits_XV, record, ids_Xd = gather_rows((logits_XV, record, ids_Xd), idx_X)
            ids_Xd = ids_Xd.at[:, d].set(parent_BR.reshape(-1))  # depth d+1: the parent, named within its prompt

        stats = base_stats(mcfg, lengths_B, tree.num_leaves, record, model_calls=1 + calls, decode_steps=calls,
                           flops=flops, max_len=max_len, rollback_window=0, overflow_X=state.overflow_B,
                           state_read=read)
        stats |= {"decoded_rows_tokens": rows_tokens,
                  "independent_rows_tokens": jnp.sum(jnp.maximum(record.lengths_X - 1, 0)),
                  "tree_leaves": jnp.int32(tree.num_leaves), "reallocated_slots": moved,
                  "invalid_leaves": jnp.sum(~valid_X, dtype=jnp.int32)}
        G = tree.num_leaves
        return TreeRollout(to_generation(record, B, stats), ids_Xd.reshape(B, G, D), valid_X.reshape(B, G))

    return jax.jit(run)
