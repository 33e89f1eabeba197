"""Early exits (ALGORITHMS §4): LM heads after chosen layers, their training losses, and the pieces early-exit
decoding (`lmx.decoding.early_exit`) and self-speculation (`SelfDraft`) use.

`ModelConfig.exits = ExitConfig(layers=(2, 4))` adds an exit after layers 2 and 4 (of, say, 6): the model is the
same `LM` with the same params plus (optionally) a norm and a JEI-DNN gate per exit; teacher-forced calls return
in `aux`:
- `exit_logits_EBTV`: float32 logits of each exit, in `layers` order: by default the shared final norm + LM head
  on that layer's output (LayerSkip), or the exit's own norm (`per_exit_norm`) + the shared head;
- `exit_gates_EBT` (with `gates`): g_e = sigmoid(w_e · h_e + b_e), the JEI-DNN exit gate on the normed exit state.
The final layer is always the last exit. Losses: `layerskip_loss` (weighted CE over the exits and the final head)
and `jei_loss` (E over the gate-induced exit distribution P(exit at e) = g_e Π_{j<e}(1 − g_j) of CE + λ·cost).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig, repeating_unit

CONFIDENCE_MEASURES = ("softmax", "state", "gate")


@dataclass(frozen=True)
class ExitConfig:
    """layers: exit after this many layers, strictly increasing, each in [1, num_layers) (the full depth is always
    the last exit). per_exit_norm: each exit has its own RMSNorm (else the final norm). gates: a learned exit gate
    per exit (JEI-DNN; the "gate" confidence of early-exit decoding). loss_weight: each exit's CE weight in
    `layerskip_loss`, relative to the final head's 1."""

    layers: tuple[int, ...]
    per_exit_norm: bool = False
    gates: bool = False
    loss_weight: float = 1.0
    loss: str = "layerskip"  # the SFT loss `exit_loss` gives: "layerskip" or "jei" (needs gates)
    cost_weight: float = 0.1  # JEI-DNN's λ

    def __post_init__(self):
        try:
            layers = tuple(operator.index(l) for l in self.layers)
        except TypeError:
            raise ValueError(f"exits.layers={self.layers!r} must be a sequence of ints") from None
        increasing = all(a < b for a, b in zip(layers[:-1], layers[1:], strict=True))
        if not layers or layers[0] < 1 or not increasing:
            raise ValueError(f"exits.layers={self.layers!r} must be non-empty, strictly increasing and >= 1")
        object.__setattr__(self, "layers", layers)
        if not 0 <= self.loss_weight < float("inf"):
            raise ValueError(f"exits.loss_weight={self.loss_weight!r} must be finite and >= 0")
        if self.loss not in ("layerskip", "jei"):
            raise ValueError(f"exits.loss={self.loss!r} must be 'layerskip' or 'jei'")
        if self.loss == "jei" and not self.gates:
            raise ValueError("exits.loss='jei' needs gates=True (JEI-DNN trains the exit gates)")


def check(cfg: ModelConfig) -> ExitConfig:
    """cfg.exits, checked against the model: every exit inside the stack, at a boundary of the scanned unit."""
    e = cfg.exits
    if not isinstance(e, ExitConfig):
        raise TypeError(f"ModelConfig.exits must be an ExitConfig, got {e!r}")
    bad = [l for l in e.layers if l >= cfg.num_layers]
    if bad:
        raise ValueError(f"exits.layers={e.layers}: exits {bad} are not below num_layers={cfg.num_layers} (the "
                         "full depth is always the last exit)")
    u = len(repeating_unit(cfg.layer_pattern))
    if any(l % u for l in e.layers):
        raise ValueError(f"exits.layers={e.layers} must be multiples of the layer pattern's repeating unit ({u} "
                         "layers): the stack is scanned unit by unit")
    return e


def build(cfg: ModelConfig) -> nn.Module:
    from lmx.models.lm import LM  # the LM computes the exit heads itself (its scan emits every layer's output)

    check(cfg)
    return LM(cfg)


def _norm(cfg: ModelConfig, name: str):
    from lmx.models.lm import _norm

    return _norm(cfg, name)


def exit_heads(cfg: ModelConfig, layer_outputs_UBTD, final_norm, project) -> dict:
    """The aux entries of the exits (module docstring), called inside LM's compact __call__ (so the per-exit
    norms and gates are LM params named exit_norm_{e}, exit_gate_{e}). layer_outputs_UBTD: the scanned stack's
    output after each unit; project(h_BTD) -> logits: the LM head (on the positions logits_at_B picks)."""
    e = check(cfg)
    u = len(repeating_unit(cfg.layer_pattern))
    logits, gates = [], []
    for i, l in enumerate(e.layers):
        h_BTD = (_norm(cfg, f"exit_norm_{i}") if e.per_exit_norm else final_norm)(layer_outputs_UBTD[l // u - 1])
        logits.append(project(h_BTD).astype(jnp.float32))
        if e.gates:
            gates.append(gate(nn.Dense(1, dtype=jnp.float32, name=f"exit_gate_{i}")(h_BTD.astype(jnp.float32))))
    out = {"exit_logits_EBTV": jnp.stack(logits)}
    if e.gates:
        out["exit_gates_EBT"] = jnp.stack(gates)
    return out


def gate(z_BT1):
    return jax.nn.sigmoid(z_BT1[..., 0])


def exit_distribution(gates_EBT):
    """JEI-DNN: P(exit at e) = g_e Π_{j<e}(1 − g_j) for the E gated exits, and the remainder Π_j(1 − g_j) at the
    full depth: [E + 1, B, T], summing to 1 over axis 0."""
    keep_EBT = jnp.cumprod(1.0 - gates_EBT, axis=0)
    before_EBT = jnp.concatenate([jnp.ones_like(gates_EBT[:1]), keep_EBT[:-1]], axis=0)
    return jnp.concatenate([gates_EBT * before_EBT, keep_EBT[-1:]], axis=0)


def _token_ce(logits_BTV, tokens_BT):
    """Next-token CE per position (position t scored against token t + 1): [B, T − 1]."""
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    return logz_BT - jnp.take_along_axis(logits_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


def _all_logits(out):
    return jnp.concatenate([out.aux["exit_logits_EBTV"], out.logits_BTV[None]], axis=0)  # [E + 1, B, T, V]


def _forward(model, params, batch):
    return model.apply({"params": params}, batch["tokens_BT"], positions_BT=batch.get("positions_BT"),
                       segment_ids_BT=batch.get("segment_ids_BT"))


def layerskip_loss(model, params, batch: dict, rng):
    """LayerSkip's early-exit loss, an SFT LossFn: (CE_final + w Σ_e CE_e) / (1 + w E), token means over the
    batch's loss mask (sft's shift convention), w = exits.loss_weight. Metrics: ce_exit{e} per exit, ce_final."""
    del rng
    out = _forward(model, params, batch)
    mask_BT = batch["loss_mask_BT"][:, 1:].astype(jnp.float32)
    denom = jnp.maximum(mask_BT.sum(), 1.0)
    ce_E = jax.vmap(lambda l: (_token_ce(l, batch["tokens_BT"]) * mask_BT).sum() / denom)(_all_logits(out))
    w, E = model.cfg.exits.loss_weight, ce_E.shape[0] - 1
    loss = (ce_E[-1] + w * ce_E[:-1].sum()) / (1 + w * E)
    return loss, {"tokens": mask_BT.sum(), "ce_final": ce_E[-1],
                  **{f"ce_exit{l}": ce_E[i] for i, l in enumerate(model.cfg.exits.layers)}}


def make_jei_loss(cost_weight: float):
    """JEI-DNN's loss (arXiv 2310.09163), an SFT LossFn: per target token, E_{e ~ P(exit)}[CE_e + λ·depth_e / L]
    with P from the gates (`exit_distribution`), λ = cost_weight; the exit heads train through CE_e and the gates
    through P. Needs ExitConfig(gates=True). Metrics: expected_depth (layers), ce_final."""
    lam = float(cost_weight)
    if not 0 <= lam < float("inf"):
        raise ValueError(f"cost_weight={cost_weight!r} must be finite and >= 0")

    def loss_fn(model, params, batch, rng):
        del rng
        e = model.cfg.exits
        if not e.gates:
            raise ValueError("the JEI-DNN loss needs exit gates: ModelConfig.exits = ExitConfig(..., gates=True)")
        out = _forward(model, params, batch)
        mask_BT = batch["loss_mask_BT"][:, 1:].astype(jnp.float32)
        denom = jnp.maximum(mask_BT.sum(), 1.0)
        ce_EBT = jax.vmap(lambda l: _token_ce(l, batch["tokens_BT"]))(_all_logits(out))
        p_EBT = exit_distribution(out.aux["exit_gates_EBT"])[:, :, :-1]
        depth_E = jnp.asarray([*e.layers, model.cfg.num_layers], jnp.float32)
        per_BT = (p_EBT * (ce_EBT + lam * depth_E[:, None, None] / model.cfg.num_layers)).sum(0)
        expected_depth = ((p_EBT * depth_E[:, None, None]).sum(0) * mask_BT).sum() / denom
        return (per_BT * mask_BT).sum() / denom, {"tokens": mask_BT.sum(), "expected_depth": expected_depth,
                                                   "ce_final": (ce_EBT[-1] * mask_BT).sum() / denom}

    return loss_fn


def exit_loss(exits: ExitConfig):
    """The SFT LossFn of a model with these exits: LayerSkip's, or JEI-DNN's with λ = exits.cost_weight."""
    return layerskip_loss if exits.loss == "layerskip" else make_jei_loss(exits.cost_weight)
