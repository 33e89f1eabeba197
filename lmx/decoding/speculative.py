"""Exact speculative decoding (Leviathan et al. 2023; Chen et al. 2023) as one jitted program, built from the
decode-engine pieces (`generate`'s prepare / prefill / Record / stop predicates, the layer loop in pieces and the
state helpers).

A round, for every row x at once (rows accept different numbers of tokens, so every row has its own length):
1. Draft: feed the row's last token, then each drafted token, to the draft, one token per call; the draft's
   processed distribution q_i (the sampler's temperature, top-k, top-p, min-p) gives d_{i+1} ~ q_i, i < γ_r. One
   more draft call feeds d_{γ_r}, so the draft's state holds every token the target may accept.
2. Verify: one target call on [last, d_1 .. d_γ] gives p_0 .. p_γ (processed the same way).
3. Accept d_i while u_i·q_{i-1}(d_i) < p_{i-1}(d_i) (probability min(1, p/q)); at the first rejection, position k,
   sample from norm(max(0, p_k − q_k)); if all γ_r are accepted, sample a bonus token from p_k. The emitted
   tokens d_1 .. d_k, c are distributed exactly as `generate` with the same sampler would draw them; greedy
   (one-hot p and q) accepts d_i iff it is the target's argmax, so greedy output equals greedy `generate`.
4. Roll both states back to the accepted prefix (`truncate`: KV by lengths, SSM layers through their rings; the
   target's multi-token call is committed only up to it).
`SelfDraft(E)` drafts with the target's own first E layers + final norm + head (LayerSkip-style): those layers
write the target's own state while drafting, and verification runs only layers [E, L) on the hidden states the
draft computed for them.

Adaptive draft length (`adaptive=True`): after each round α̂ ← 0.8·α̂ + 0.2·α_round (α_round = accepted /
verified over the round's live rows; α̂₀ = 0.5, clipped to [0.01, 0.99]), and the next round drafts
γ_r = argmax_{1 ≤ γ' ≤ γ} (1 − α̂^{γ'+1}) / ((1 − α̂)(γ'·c + 1)), c = the draft's FLOPs per token over the
target's (Leviathan et al. §3.4). Verification keeps the static γ + 1 positions (static shapes); only the draft
steps, the sequential part, shrink.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    keep_going,
    prefill,
    prepare,
    to_generation,
)
from lmx.decoding.sampling import Greedy, Sampler, process_logits, sample, token_logprobs
from lmx.models.lm import advance, decode_params, embed, forward, head, make_ctx, run_layers
from lmx.models.state import init_state, repeat, truncate

EMA = 0.8  # weight of the previous α̂ in the adaptive rule
# False samples the token after a rejection from p itself instead of norm(max(0, p − q)): an inexact variant that
# exists only as the negative control of the distribution test (tests/decoding/test_speculative.py).
_RESIDUAL_CORRECTION = True


@dataclass(frozen=True)
class SelfDraft:
    """Draft with the target's own first `num_layers` layers, then its final norm and LM head."""

    num_layers: int


def _check_window(cfg, gamma: int, who: str):
    if cfg.num_ssm_layers and cfg.ssm.rollback_window < gamma:
        raise ValueError(f"{who}'s SSM layers keep rollback_window={cfg.ssm.rollback_window} steps, fewer than "
                         f"gamma={gamma}: a rejection must roll back up to gamma draft steps (set "
                         f"SSMConfig.rollback_window >= {gamma})")


def speculative_generate(
    target, target_params, prompts, *, draft, gamma: int = 4, adaptive: bool = False,
    sampler: Greedy | Sampler = Greedy(),  # noqa: B008 (frozen dataclasses: immutable defaults)
    max_new_tokens: int, stop_tokens=(), rng=None, num_samples: int = 1,
    stop_when=AllFinished(),  # noqa: B008
    max_len: int | None = None, pad_id: int = 0,
) -> Generation:
    """`generate`'s arguments and result, with tokens drafted by `draft` and verified by `target` (module docstring).

    draft: (draft_model, draft_params), any architecture with the target's vocabulary, or SelfDraft(num_layers=E)
      with 1 <= E < L. A draft with SSM layers (or a self-draft of an SSM target) needs rollback_window >= gamma.
    gamma: tokens drafted per round (the most, with adaptive=True).
    max_len: cache positions; default the bucketed prompt + max_new_tokens + gamma (verification looks gamma ahead).

    stats: generate's keys (model_calls = target_calls; flops = both models') plus target_calls (the prefill and
    one verification per round), draft_calls (one-token draft calls, plus the draft's prefill), draft_tokens
    (tokens drafted for live rows), verified_tokens (those the target tested: up to and including the first
    rejection), accepted_tokens, acceptance_rate α = accepted / verified (the per-token acceptance probability of
    the theory; accepted / drafted would also count the tokens after a rejection, which are never tested),
    tokens_per_target_call (tokens a verification yields per live row, before stop tokens and the budget cut
    them: (1 − α^{γ+1}) / (1 − α) in theory), target_flops, draft_flops, rounds, row_rounds (live rows summed
    over rounds: the denominator of tokens_per_target_call).
    """
    gamma = _int_at_least("gamma", gamma, 1)
    cfg = target.cfg
    if isinstance(draft, SelfDraft):
        E = draft.num_layers
        if isinstance(E, bool) or not isinstance(E, int) or not 1 <= E < cfg.num_layers:
            raise ValueError(f"SelfDraft(num_layers={E!r}) must lie in [1, {cfg.num_layers}) (the target's "
                             f"{cfg.num_layers} layers)")
        _check_window(cfg.replace(num_layers=E, layer_pattern=cfg.layer_pattern[:E]), gamma, "the self-draft")
        draft_model, draft_params = draft, None
    else:
        if not (isinstance(draft, tuple) and len(draft) == 2 and hasattr(draft[0], "cfg")):
            raise TypeError(f"draft must be (draft_model, draft_params) or SelfDraft(num_layers=E), got {draft!r:.80}")
        draft_model, draft_params = draft
        if draft_model.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"the draft's vocab_size={draft_model.cfg.vocab_size} differs from the target's "
                             f"vocab_size={cfg.vocab_size}: they must share one vocabulary")
        _check_window(draft_model.cfg, gamma, "the draft")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
    p = prepare(cfg, prompts, max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_tokens, rng=rng,
                num_samples=num_samples, stop_when=stop_when, max_len=max_len, pad_id=pad_id, extra_positions=gamma)
    if draft_params is not None and p.max_len > draft_model.cfg.max_seq_len:
        raise ValueError(f"max_len={p.max_len} exceeds the draft's max_seq_len={draft_model.cfg.max_seq_len}")
    fn = _compiled(target, draft_model, gamma, adaptive, sampler, p.stop_tokens, p.num_samples, stop_when,
                   p.max_new_tokens, p.max_len, p.pad_id)
    dparams = None if draft_params is None else decode_params(draft_model, draft_params)
    return fn(decode_params(target, target_params), dparams, p.tokens_BT, p.lengths_B,
              jax.random.key(0) if rng is None else rng)


def _probs(sampler, logits_XV):
    return jax.nn.softmax(process_logits(sampler, logits_XV), axis=-1)


def _best_gamma(alpha, gamma_max: int, c: float):
    """argmax over 1..gamma_max of the expected speedup (1 − α^{γ+1}) / ((1 − α)(γc + 1))."""
    g_G = jnp.arange(1, gamma_max + 1, dtype=jnp.float32)
    speedup_G = (1 - alpha ** (g_G + 1)) / ((1 - alpha) * (g_G * c + 1))
    return jnp.argmax(speedup_G).astype(jnp.int32) + 1


@functools.lru_cache(maxsize=32)
def _compiled(target, draft, gamma, adaptive, sampler, stop_tokens, num_samples, stop_when, max_new_tokens,
              max_len, pad_id):
    cfg, R, G = target.cfg, num_samples, gamma
    stop_S = np.array(stop_tokens, np.int32)
    self_draft = isinstance(draft, SelfDraft)
    E = draft.num_layers if self_draft else None
    dcfg = cfg.replace(num_layers=E, layer_pattern=cfg.layer_pattern[:E]) if self_draft else draft.cfg
    # SSM rings as allocated: a self-draft's target keeps cfg's rollback window, a separate target none (its draft
    # keeps its config's: None).
    window, dwindow = (cfg.ssm.rollback_window if self_draft and cfg.num_ssm_layers else 0), None
    # Draft cost per token relative to the target's (matmul FLOPs), for the adaptive rule.
    c = cost.matmul_params(dcfg) / cost.matmul_params(cfg)
    head_flops = 2.0 * cfg.vocab_size * cfg.d_model  # per position (the self-draft pays it on top of E layers)

    def draft_call(tparams, dparams, tstate, dstate, tok_X, lengths_X):
        """One draft token per row at lengths_X: (logits_XV, tstate, dstate, the hidden state at layer E)."""
        if self_draft:
            x_X1D = embed(target, tparams, tok_X[:, None])
            x_X1D, first = run_layers(target, tparams, x_X1D, tstate.layers[:E], make_ctx(lengths_X, 1), 0, E)
            logits_X1V, _ = head(target, tparams, x_X1D)
            return logits_X1V[:, 0], tstate.replace(layers=first + tstate.layers[E:]), dstate, x_X1D[:, 0]
        out = forward(draft, dparams, tok_X[:, None], dstate)  # dstate is at lengths_X
        return out.logits_BTV[:, 0], tstate, out.state, None

    def run(tparams, dparams, tokens_BT, lengths_B, rng):
        B = tokens_BT.shape[0]
        X = B * R
        # The target's multi-token verifications are committed only up to the accepted prefix: it never rolls back
        # through its rings, unless it drafts for itself (then its first layers step one token at a time).
        tstate = init_state(cfg, B, max_len, rollback_window=None if self_draft else 0)
        logits_BV, tstate = prefill(target, tparams, tokens_BT, lengths_B, tstate)
        tstate = repeat(tstate, R)
        dstate, draft_prefill = None, 0
        if not self_draft:
            _, dstate = prefill(draft, dparams, tokens_BT, lengths_B, init_state(dcfg, B, max_len))
            dstate, draft_prefill = repeat(dstate, R), 1
        logits_XV = jnp.repeat(logits_BV, R, axis=0)
        first_X = sample(sampler, logits_XV, jax.random.fold_in(rng, 0))
        record, _ = Record.empty(X, max_new_tokens, pad_id).append(
            first_X[:, None], token_logprobs(sampler, logits_XV, first_X)[:, None], jnp.ones((X,), jnp.int32),
            stop_S, pad_id)
        zero_i = jnp.int32(0)
        counts = dict(rounds=zero_i, draft_calls=zero_i, draft_tokens=zero_i, verified_tokens=zero_i,
                      accepted_tokens=zero_i, row_rounds=zero_i, call_tokens=zero_i)
        flops_X = {k: jnp.zeros((X,), jnp.float32) for k in ("target", "draft", "target_read", "draft_read")}
        carry = (tstate, dstate, first_X, record, jnp.int32(G), jnp.float32(0.5), counts, flops_X,
                 jnp.zeros((X,), bool))

        def body(carry):
            tstate, dstate, last_X, record, g_r, alpha, counts, flops_X, overflow_X = carry
            key = jax.random.fold_in(rng, counts["rounds"] + 1)
            k_draft, k_accept, k_fix = jax.random.split(key, 3)
            alive_X = record.alive()
            n_X = tstate.lengths_B

            # 1. Draft γ_r tokens, then feed the last of them too (its sample is unused).
            def draft_step(i, c):
                tstate, dstate, toks_XT, q_XGV, hid_XTD = c
                logits_XV, tstate, dstate, hid_XD = draft_call(tparams, dparams, tstate, dstate, toks_XT[:, i],
                                                               n_X + i)
                d_X = sample(sampler, logits_XV, jax.random.fold_in(k_draft, i))
                toks_XT = toks_XT.at[:, i + 1].set(d_X, mode="drop")  # i = γ: past the end, dropped
                q_XGV = q_XGV.at[:, i].set(_probs(sampler, logits_XV), mode="drop")
                if self_draft:
                    hid_XTD = hid_XTD.at[:, i].set(hid_XD)
                return tstate, dstate, toks_XT, q_XGV, hid_XTD

            toks_XT = jnp.full((X, G + 1), pad_id, jnp.int32).at[:, 0].set(last_X)
            q_XGV = jnp.zeros((X, G, cfg.vocab_size), jnp.float32)
            hid_XTD = jnp.zeros((X, G + 1, cfg.d_model), jnp.dtype(cfg.dtype)) if self_draft else None
            tstate, dstate, toks_XT, q_XGV, hid_XTD = jax.lax.fori_loop(
                0, g_r + 1, draft_step, (tstate, dstate, toks_XT, q_XGV, hid_XTD))

            # 2. Verify all γ + 1 positions in one target call.
            if self_draft:
                x_XTD, rest = run_layers(target, tparams, hid_XTD, tstate.layers[E:], make_ctx(n_X, G + 1), E)
                p_logits_XTV, _ = head(target, tparams, x_XTD)
                tstate = advance(tstate, tstate.layers[:E] + rest, G + 1)
            else:
                out = forward(target, tparams, toks_XT, tstate)
                p_logits_XTV, tstate = out.logits_BTV, out.state
            p_XTV = _probs(sampler, p_logits_XTV.reshape(X * (G + 1), -1)).reshape(X, G + 1, -1)

            # 3. Accept the longest prefix, then one corrected (or bonus) token.
            d_XG = toks_XT[:, 1:]
            p_d_XG = jnp.take_along_axis(p_XTV[:, :G], d_XG[..., None], axis=-1)[..., 0]
            q_d_XG = jnp.take_along_axis(q_XGV, d_XG[..., None], axis=-1)[..., 0]
            u_XG = jax.random.uniform(k_accept, (X, G))
            ok_XG = (u_XG * q_d_XG < p_d_XG) & (jnp.arange(G) < g_r)
            k_X = jnp.sum(jnp.cumprod(ok_XG, axis=1), axis=1, dtype=jnp.int32)
            rows = jnp.arange(X)
            p_k_XV = p_XTV[rows, k_X]
            resid_XV = jnp.maximum(p_k_XV - q_XGV[rows, jnp.minimum(k_X, G - 1)], 0.0)
            use_resid_X = (k_X < g_r) & (jnp.sum(resid_XV, -1) > 0) & _RESIDUAL_CORRECTION
            resid_XV = jnp.where(use_resid_X[:, None], resid_XV, p_k_XV)
            fix_X = jax.random.categorical(k_fix, jnp.log(resid_XV), axis=-1).astype(jnp.int32)

            j_T = jnp.arange(G + 1)
            d_ext_XT = jnp.concatenate([d_XG, jnp.full((X, 1), pad_id, jnp.int32)], axis=1)
            emit_XT = jnp.where(j_T < k_X[:, None], d_ext_XT, fix_X[:, None])
            logp_XT = token_logprobs(sampler, p_logits_XTV.reshape(X * (G + 1), -1), emit_XT.reshape(-1)).reshape(
                X, G + 1)
            record, _ = record.append(emit_XT, logp_XT, k_X + 1, stop_S, pad_id)

            # 4. Both states back to the accepted prefix; the corrected token is the next round's first input.
            keep_X = n_X + k_X + 1
            overflow_X = overflow_X | (tstate.overflow_B & alive_X)
            tstate = truncate(tstate, keep_X)
            if not self_draft:
                overflow_X = overflow_X | (dstate.overflow_B & alive_X)
                dstate = truncate(dstate, keep_X)

            live = lambda a_X: jnp.sum(jnp.where(alive_X, a_X, 0), dtype=jnp.int32)
            verified_X = jnp.minimum(k_X + 1, g_r)
            counts = dict(rounds=counts["rounds"] + 1, draft_calls=counts["draft_calls"] + g_r + 1,
                          draft_tokens=counts["draft_tokens"] + live(jnp.broadcast_to(g_r, (X,))),
                          verified_tokens=counts["verified_tokens"] + live(verified_X),
                          accepted_tokens=counts["accepted_tokens"] + live(k_X),
                          row_rounds=counts["row_rounds"] + live(jnp.ones_like(k_X)),
                          call_tokens=counts["call_tokens"] + live(k_X + 1))
            if self_draft:
                verify_X = cost.forward_flops(cfg, n_X, n_X + G + 1) - cost.forward_flops(dcfg, n_X, n_X + G + 1)
                verify_X = verify_X + head_flops * (G + 1)
            else:
                verify_X = cost.forward_flops(cfg, n_X, n_X + G + 1)
            live_f = lambda a_X: jnp.where(alive_X, a_X, 0.0)  # noqa: E731
            # State reads: the target's verify call; a separate draft's own calls (a self-draft's layers are the
            # target's, whose reads of those positions are counted once, in the verify call).
            flops_X = dict(target=flops_X["target"] + live_f(verify_X),
                           draft=flops_X["draft"] + live_f(cost.forward_flops(dcfg, n_X, n_X + g_r + 1)),
                           target_read=flops_X["target_read"] + live_f(cost.state_bytes_read(cfg, n_X, n_X + G + 1,
                                                                                              window)),
                           draft_read=flops_X["draft_read"] + (0.0 if self_draft else live_f(
                               cost.state_bytes_read(dcfg, n_X, n_X + g_r + 1, dwindow))))
            if adaptive:
                a_round = live(k_X) / jnp.maximum(live(verified_X), 1)
                alpha = jnp.clip(EMA * alpha + (1 - EMA) * a_round, 0.01, 0.99)
                g_r = _best_gamma(alpha, G, c)
            return tstate, dstate, fix_X, record, g_r, alpha, counts, flops_X, overflow_X

        cond = lambda carry: keep_going(carry[3], stop_when, B)
        tstate, dstate, _, record, _, _, counts, flops_X, overflow_X = jax.lax.while_loop(cond, body, carry)

        prompt_flops = jnp.sum(cost.forward_flops(cfg, 0, lengths_B))
        target_flops = prompt_flops + jnp.sum(flops_X["target"])
        draft_flops = draft_prefill * jnp.sum(cost.forward_flops(dcfg, 0, lengths_B)) + jnp.sum(flops_X["draft"])
        target_calls = 1 + counts["rounds"]
        stats = base_stats(cfg, lengths_B, R, record, model_calls=target_calls, decode_steps=counts["rounds"],
                           flops=target_flops + draft_flops, max_len=max_len, rollback_window=window,
                           overflow_X=overflow_X)
        # Bytes: each target call reads the target's weights, each draft call a separate draft's (a self-draft's
        # layers are the target's own weights, re-read per draft call: its first E layers and the head).
        prompt_read = jnp.sum(cost.state_bytes_read(cfg, 0, lengths_B, window))
        if not self_draft:
            prompt_read += draft_prefill * jnp.sum(cost.state_bytes_read(dcfg, 0, lengths_B, dwindow))
        draft_weights = cost.weight_bytes(dcfg)  # a self-draft: its E layers, the embedding and the head
        read = prompt_read + jnp.sum(flops_X["target_read"]) + jnp.sum(flops_X["draft_read"])
        weights = (jnp.float32(cost.weight_bytes(cfg)) * target_calls
                   + jnp.float32(draft_weights) * (counts["draft_calls"] + draft_prefill))
        stats.update(weight_bytes_read=weights, state_bytes_read=read, bytes_moved=weights + read)
        if not self_draft:  # the draft's state is allocated too
            draft_kv = X * max_len * cost.kv_bytes_per_token(dcfg)
            draft_ssm = X * cost.ssm_state_bytes_per_row(dcfg)
            stats.update(kv_bytes=stats["kv_bytes"] + draft_kv, ssm_state_bytes=stats["ssm_state_bytes"] + draft_ssm,
                         state_bytes=stats["state_bytes"] + draft_kv + draft_ssm)
        verified = jnp.maximum(counts["verified_tokens"], 1)
        stats.update(
            target_calls=target_calls, draft_calls=counts["draft_calls"] + draft_prefill,
            draft_tokens=counts["draft_tokens"], verified_tokens=counts["verified_tokens"],
            accepted_tokens=counts["accepted_tokens"], acceptance_rate=counts["accepted_tokens"] / verified,
            tokens_per_target_call=counts["call_tokens"] / jnp.maximum(counts["row_rounds"], 1),
            target_flops=target_flops, draft_flops=draft_flops, rounds=counts["rounds"],
            row_rounds=counts["row_rounds"])
        return to_generation(record, B, stats)

    return jax.jit(run)
