"""DYNAMAX exit classifiers (arXiv 2504.20922): a small Mamba-2 block per early exit that reads the exit's normed
hidden states and gives, per position, the confidence c_e = P(exiting at e is right) — the "classifier" measure of
early-exit decoding (`lmx.decoding.early_exit`). `ExitConfig(classifier="mamba")` turns them on.

The block: a down-projection of h_e to the classifier width (`ExitConfig.classifier_dim`), a Mamba-2 mixer at that
width (expand 2, heads of 8, state 16) with a residual, and a linear read-out to one logit; c_e = sigmoid(logit).
Its input is a stop-gradient of h_e, so its loss trains the classifier alone, never the exits it judges.

Training target: whether the exit's top-1 token equals the final head's at that position (CALM's consistency
target; it is defined at every position and is what early-exit decoding tries to preserve), as a binary
cross-entropy over the loss mask's positions (`classifier_loss`), added to the exit losses with weight
`ExitConfig.classifier_weight`.

Decoding: being recurrent, each classifier keeps a decode state per exit, a Mamba-2 layer state at the classifier's
width (`ExitDecodeState.classifiers`, batch on axis 0 like every decode-state leaf). The exits model's
`decode_forward` hook (prefill, plain decode steps) and the EarlyExit stepper advance them position by position on
the exit's hidden state (a token that exited earlier feeds later exits its exited state, as it feeds later layers).
A multi-token call is folded into the rings at once, as if all its tokens were kept; the rings remember the last
ROLLBACK positions, so rolling back (generate's right-padded prefill, speculative verification) by up to that many
positions restores the classifier's state by lengths alone, like attention's KV. A row rolled back further is
flagged in `overflow_B` at its next call (its confidences are not to be trusted).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig, SSMConfig
from lmx.models.ssm import Mamba2LayerState, Mamba2Mixer
from lmx.models.state import DecodeState

CLASSIFIERS = ("mamba",)
ROLLBACK = 16  # positions a classifier state can roll back (>= generate's prompt padding, PROMPT_BUCKET - 1)
HEAD_DIM = 8


def classifier_config(cfg: ModelConfig) -> ModelConfig:
    """The one-layer Mamba-2 config of cfg's exit classifiers (d_model = ExitConfig.classifier_dim)."""
    width = cfg.exits.classifier_dim
    return ModelConfig(vocab_size=cfg.vocab_size, d_model=width, num_layers=1, layer_pattern=("ssm",),
                       norm_eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       ssm=SSMConfig(num_heads=2 * width // HEAD_DIM, head_dim=HEAD_DIM, state_size=16, expand=2))


class ExitClassifier(nn.Module):
    """(h_BTD, state | None, lengths_B, segment_ids_BT) -> (logit_BT float32, state): one exit's classifier on its
    normed hidden states; state as a Mamba-2 layer's (None: teacher-forced)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BTD, state=None, lengths_B=None, segment_ids_BT=None):
        small = classifier_config(self.cfg)
        dt = jnp.dtype(small.dtype)
        # Inside the classifier D is its own width (classifier_dim), not the model's.
        u_BTD = nn.Dense(small.d_model, dtype=dt, param_dtype=jnp.dtype(small.param_dtype), name="down")(
            jax.lax.stop_gradient(h_BTD))
        y_BTD, state = Mamba2Mixer(small, name="mixer")(u_BTD, state, lengths_B, segment_ids_BT)
        logit_BT1 = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.dtype(small.param_dtype), name="out")(
            (u_BTD + y_BTD).astype(jnp.float32))
        return logit_BT1[..., 0], state


def classifier_loss(logits_EBT, exit_logits_EBTV, final_logits_BTV, mask_BT):
    """Binary cross-entropy of each exit's classifier against "the exit's top-1 equals the final head's", mean over
    exits and the positions whose next token the loss mask marks (sft's shift convention). Returns (bce,
    agreement: the fraction of those positions where the exits agree with the final head)."""
    label_EBT = (jnp.argmax(exit_logits_EBTV, -1) == jnp.argmax(final_logits_BTV, -1)[None]).astype(jnp.float32)
    label_EBT = jax.lax.stop_gradient(label_EBT)
    z_EBT = logits_EBT.astype(jnp.float32)
    bce_EBT = jax.nn.softplus(z_EBT) - label_EBT * z_EBT  # -[y log σ(z) + (1 - y) log(1 - σ(z))]
    w_BT = mask_BT[:, 1:].astype(jnp.float32)
    denom = jnp.maximum(w_BT.sum(), 1.0) * z_EBT.shape[0]
    mean = lambda a_EBT: (a_EBT[:, :, :-1] * w_BT).sum() / denom  # noqa: E731
    return mean(bce_EBT), mean(label_EBT)


@flax.struct.dataclass
class ExitDecodeState(DecodeState):
    """The decode state of a model with exit classifiers: DecodeState plus one classifier state per exit."""

    classifiers: tuple = ()


def init_classifier_state(cfg: ModelConfig, batch: int, max_len: int):
    return Mamba2LayerState.init(classifier_config(cfg), batch, max_len, jnp.dtype(cfg.dtype), ROLLBACK)


def with_classifiers(cfg: ModelConfig, state: DecodeState) -> ExitDecodeState:
    """state as an ExitDecodeState (empty classifier states for a plain DecodeState: a fresh decode)."""
    if isinstance(state, ExitDecodeState):
        return state
    fresh = tuple(init_classifier_state(cfg, state.batch_size, state.max_len) for _ in cfg.exits.layers)
    return ExitDecodeState(lengths_B=state.lengths_B, layers=state.layers, overflow_B=state.overflow_B,
                           max_len=state.max_len, classifiers=fresh)


def lost_rows(state: ExitDecodeState):
    """Rows rolled back further than the classifier rings remember (flagged in overflow_B)."""
    lost_B = jnp.zeros_like(state.overflow_B)
    for c in state.classifiers:
        lost_B |= state.lengths_B < c.floor_B
    return lost_B


def classifier_step(cfg: ModelConfig, params: dict, h_BTD, state, lengths_B):
    """Run one exit's classifier (its params) on T positions from lengths_B, folding them into its state at once:
    (logit_BT, state)."""
    logit_BT, state = ExitClassifier(cfg, parent=None).apply({"params": params}, h_BTD, state, lengths_B)
    return logit_BT, state.commit(lengths_B + h_BTD.shape[1])


def classifier_flops(params: dict) -> float:
    """Matmul FLOPs of one classifier call per position: 2 per parameter (lmx.decoding.cost's convention)."""
    return 2.0 * sum(x.size for x in jax.tree.leaves(params))
