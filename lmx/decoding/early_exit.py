"""Early-exit decoding (CALM, arXiv 2207.07061) inside generate's jitted loop, for models with exits: an
`lmx.models.early_exit.ExitConfig`, or a recursive model's loop boundaries (`RecursionConfig(loop_exits=True)`);
the model's variant module names them through the `decode_exits(cfg)` hook of lmx.models.lm.

`generate(..., stepper=EarlyExit(measure, threshold))` (or `early_exit_generate`) replaces the one-token decode
step: the token runs through the layers up to the first exit; where the exit is confident enough the row takes its
logits, and its state is pinned: every later layer sees the exited hidden state as its input, so the state those
layers keep for this position comes from it, as CALM fills skipped layers (later tokens read it): an attention
layer's K/V, an SSM layer's conv and recurrent state (advanced by its in-projection, conv and state update on the
exited state). When every live row has exited, the remaining layers do not run at all (a `lax.cond`): attention
layers only compute and write the K/V of the pinned state, SSM layers only their state update (their
out-projection is dead code there, which XLA drops), and no MLP runs. Confidence at an exit (exit when ≥ threshold):
- "softmax": top-1 minus top-2 probability of the exit's softmax, in [0, 1];
- "state": cosine between the residual stream at this exit and at the previous one (the input embedding for the
  first exit), in [-1, 1]: the hidden state has saturated;
- "gate": the exit's learned JEI-DNN gate g = sigmoid(w·h + b), in [0, 1] (needs ExitConfig(gates=True));
- "classifier": the exit's DYNAMAX classifier, a small Mamba-2 block over the exit's hidden states, in [0, 1]
  (needs ExitConfig(classifier="mamba"); lmx.models.exit_classifier). Its recurrent states ride in the decode
  state (an ExitDecodeState) and advance at every exit, reached or skipped (a skipped exit sees the exited state),
  whatever the measure.
Prefill runs the full depth. Rows that exit while others go on are still computed (static shapes) but pinned, so
each row's tokens are what it would produce alone: batch 1 skips the most.

stats: generate's, with flops counting only the layers, heads, state fills and classifiers that ran, plus
layers_per_token (the depth each generated token exited at, averaged), executed_layers_per_call (layers actually
run per decode call), early_exit_fraction (tokens that exited before the full depth) and flops_saved (full-depth
decode FLOPs − flops). Bytes stats stay those of the full depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lmx.decoding import cost
from lmx.decoding.generate import generate
from lmx.models import exit_classifier as ec
from lmx.models.attention import project_kv
from lmx.models.early_exit import CONFIDENCE_MEASURES, exit_hidden, gate
from lmx.models.lm import _norm, advance, decode_exits, embed, head, make_ctx, run_layers

RANGES = {"softmax": (0.0, 1.0), "state": (-1.0, 1.0), "gate": (0.0, 1.0), "classifier": (0.0, 1.0)}


@dataclass(frozen=True)
class EarlyExit:
    """generate's stepper for early-exit decoding (module docstring)."""

    measure: str = "softmax"
    threshold: float = 0.9

    def check(self, cfg):
        if self.measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure={self.measure!r} must be one of {CONFIDENCE_MEASURES}")
        lo, hi = RANGES[self.measure]
        if not lo <= self.threshold <= hi:  # NaN fails too
            raise ValueError(f"threshold={self.threshold!r} is outside [{lo:g}, {hi:g}], the range of the "
                             f"{self.measure!r} confidence")
        e = decode_exits(cfg)
        if e is None:
            raise ValueError("early-exit decoding needs a model with exits (ModelConfig.exits = ExitConfig(...), or "
                             "a recursive model with RecursionConfig(loop_exits=True) and more than one loop)")
        if self.measure == "gate" and not e.gates:
            raise ValueError("measure='gate' needs exit gates: ExitConfig(..., gates=True)")
        if self.measure == "classifier" and e.classifier is None:
            raise ValueError("measure='classifier' needs exit classifiers: ExitConfig(..., classifier='mamba')")

    def init(self, cfg, X: int):
        zero_i, zero_f = jnp.int32(0), jnp.float32(0)
        return {"depth_sum": zero_f, "tokens": zero_i, "early": zero_i, "executed": zero_i, "calls": zero_i,
                "flops": zero_f}

    def __call__(self, model, params, tok_X, state, acc, alive_X):
        cfg = model.cfg
        exits = decode_exits(cfg)
        bounds = (0, *exits.layers, cfg.num_layers)
        E = len(bounds) - 2
        ctx = make_ctx(state.lengths_B, 1)
        x_X1D = embed(model, params, tok_X[:, None])
        X, V = tok_X.shape[0], cfg.vocab_size
        pinned = lambda mask_X, a, b: jnp.where(mask_X.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        flops = _Flops(cfg)
        classified = exits.classifier is not None
        if classified:  # DYNAMAX classifiers: their states advance at every exit a token reaches or skips
            state = ec.with_classifiers(cfg, state)
            lost_X = ec.lost_rows(state)
            clf_flops = ec.classifier_flops(params.rest["exit_classifier_0"])

        def classify(c, e, h_X1D):
            """Exit e's classifier on this position: (confidence_X, c with its state advanced)."""
            logit_X1, new = ec.classifier_step(cfg, params.rest[f"exit_classifier_{e}"], h_X1D, c["clf"][e],
                                               state.lengths_B)
            clf = c["clf"][:e] + (new,) + c["clf"][e + 1:]
            return jax.nn.sigmoid(logit_X1[:, 0]), c | {"clf": clf, "matmul": c["matmul"] + clf_flops}

        def segment(s, c):
            """Layers [bounds[s], bounds[s+1]) for every row (exited rows pinned), then exit s or the final head."""
            layers, x = list(c["layers"]), c["x"]
            for l in range(bounds[s], bounds[s + 1]):
                x, (layers[l],) = run_layers(model, params, pinned(c["exited"], c["pin"], x), (layers[l],), ctx, l,
                                             l + 1)
            kinds = cfg.layer_pattern[bounds[s]:bounds[s + 1]]
            c = c | {"x": x, "layers": tuple(layers), "executed": c["executed"] + len(kinds),
                     "attn_run": c["attn_run"] + kinds.count("attn"),
                     "matmul": c["matmul"] + sum(flops.layer[k] for k in kinds) + flops.head}
            if s == E:
                logits_XV = head(model, params, x)[0][:, 0]
                return c | {"logits": pinned(c["exited"], c["logits"], logits_XV)}
            norm = f"exit_norm_{s}" if exits.per_exit_norm else "final_norm"
            # Rows that exited already see their exited state here too (their logits are kept, not these).
            logits_X1V, h_X1D = head(model, params, pinned(c["exited"], c["pin"], x), norm=norm)
            if classified:
                conf_X, c = classify(c, s, h_X1D)
            if self.measure != "classifier":
                conf_X = self._confidence(params, s, logits_X1V[:, 0], h_X1D[:, 0], x[:, 0], c["prev"][:, 0])
            newly_X = ~c["exited"] & (conf_X >= self.threshold)
            c = c | {"logits": pinned(newly_X, logits_X1V[:, 0], c["logits"]),
                     "depth": jnp.where(newly_X, bounds[s + 1], c["depth"]), "pin": pinned(newly_X, x, c["pin"]),
                     "exited": c["exited"] | newly_X, "prev": x}
            return jax.lax.cond(jnp.all(c["exited"]), lambda c: fill(s + 1, c), lambda c: segment(s + 1, c), c)

        def fill(s, c):
            """Every row has exited: the layers from bounds[s] on only fill their state from each row's pinned
            state (CALM's propagation). Attention layers compute and store K/V alone; an SSM layer has no cheaper
            fill than its in-projection, conv and state update, so it runs as a whole on the pinned state with its
            output unused: XLA drops the out-projection (dead code), and an attention layer's MLP is never built."""
            layers = list(c["layers"])
            for l in range(bounds[s], cfg.num_layers):
                if cfg.layer_pattern[l] == "attn":
                    p = params.layers[l]
                    h_X1D = _norm(cfg).apply({"params": p["attn_norm"]}, c["pin"])
                    a = p["attn"]
                    k, v = project_kv(cfg, h_X1D, ctx.positions_BT, a["k"], a["v"], a.get("k_bias"), a.get("v_bias"))
                    layers[l] = layers[l].write(k, v, ctx.lengths_B)
                else:
                    _, (layers[l],) = run_layers(model, params, c["pin"], (layers[l],), ctx, l, l + 1)
            kinds = cfg.layer_pattern[bounds[s]:]
            c = c | {"layers": tuple(layers), "matmul": c["matmul"] + sum(flops.fill[k] for k in kinds)}
            if classified:  # the exits after bounds[s]: each classifier reads the exited state
                for e in range(s, E):
                    c = classify(c, e, exit_hidden(cfg, params, e, c["pin"], exits))[1]
            return c

        zero = jnp.int32(0)
        c = segment(0, {"x": x_X1D, "layers": state.layers, "exited": ~alive_X, "pin": x_X1D,
                        "logits": jnp.zeros((X, V), jnp.float32), "depth": jnp.full((X,), cfg.num_layers, jnp.int32),
                        "prev": x_X1D, "executed": zero, "attn_run": zero, "matmul": jnp.float32(0),
                        "clf": state.classifiers if classified else ()})
        n_live = jnp.sum(alive_X, dtype=jnp.int32)
        acc = {"depth_sum": acc["depth_sum"] + jnp.sum(jnp.where(alive_X, c["depth"], 0), dtype=jnp.float32),
               "tokens": acc["tokens"] + n_live,
               "early": acc["early"] + jnp.sum(alive_X & (c["depth"] < cfg.num_layers), dtype=jnp.int32),
               "executed": acc["executed"] + c["executed"], "calls": acc["calls"] + 1,
               "flops": acc["flops"] + jnp.sum(jnp.where(alive_X, flops.step(c, state.lengths_B), 0.0))}
        state = advance(state, c["layers"], 1)
        if classified:
            state = state.replace(classifiers=c["clf"], overflow_B=state.overflow_B | lost_X)
        return c["logits"], state, acc

    def _confidence(self, params, e, logits_XV, h_XD, x_XD, prev_XD):
        if self.measure == "softmax":
            top_X2 = jax.lax.top_k(jax.nn.softmax(logits_XV), 2)[0]
            return top_X2[:, 0] - top_X2[:, 1]
        if self.measure == "state":
            x, p = x_XD.astype(jnp.float32), prev_XD.astype(jnp.float32)
            return jnp.sum(x * p, -1) / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(p, axis=-1), 1e-12)
        g = params.rest[f"exit_gate_{e}"]
        return gate(h_XD.astype(jnp.float32)[:, None] @ g["kernel"] + g["bias"])[:, 0]

    def stats(self, cfg, stats, acc, lengths_B):
        flops = jnp.sum(cost.forward_flops(cfg, 0, lengths_B)) + acc["flops"]  # the prefill runs the full depth
        tokens = jnp.maximum(acc["tokens"], 1)
        return stats | {"flops": flops, "flops_per_token": flops / jnp.maximum(stats["tokens_generated"], 1),
                        "flops_saved": stats["flops"] - flops, "layers_per_token": acc["depth_sum"] / tokens,
                        "executed_layers_per_call": acc["executed"] / jnp.maximum(acc["calls"], 1),
                        "early_exit_fraction": acc["early"] / tokens}


class _Flops:
    """FLOPs per row of what one early-exit decode call runs (lmx.decoding.cost's conventions): the matmuls of a
    layer of each kind (`layer`), of an exit or the final head, of each kind's state fill (`fill`: attention's K/V
    projections; all of an SSM layer but its out-projection, inner width × D); and attention over the row's keys
    per attention layer run."""

    def __init__(self, cfg):
        a, D = cfg.attention, cfg.d_model
        ssm = 2.0 * cost.ssm_layer_params(cfg) if cfg.num_ssm_layers else 0.0
        self.cfg, self.head, self.per_key = cfg, 2.0 * (D * cfg.vocab_size + D), 4.0 * a.num_heads * a.head_dim
        self.layer = {"attn": 2.0 * cost.attn_layer_params(cfg), "ssm": ssm}
        self.fill = {"attn": 2.0 * 2 * D * a.num_kv_heads * a.head_dim,
                     "ssm": ssm - 2.0 * cfg.ssm.inner_dim * D if cfg.num_ssm_layers else 0.0}

    def step(self, c, lengths_X):
        w = self.cfg.attention.sliding_window
        keys_X = (lengths_X + 1 if w is None else jnp.minimum(lengths_X + 1, w)).astype(jnp.float32)
        return c["matmul"] + c["attn_run"] * self.per_key * keys_X


def early_exit_generate(model, params, prompts, *, measure: str = "softmax", threshold: float = 0.9, **kwargs):
    """`generate(model, params, prompts, stepper=EarlyExit(measure, threshold), **kwargs)` (EarlyExit.check
    rejects a threshold outside the measure's range, NaN included)."""
    return generate(model, params, prompts, stepper=EarlyExit(measure, float(threshold)), **kwargs)
