"""Early exits (ALGORITHMS §4): LM heads after chosen layers, their training losses, and the pieces early-exit
decoding (`lmx.decoding.early_exit`) and self-speculation (`SelfDraft`) use.

`ModelConfig.exits = ExitConfig(layers=(2, 4))` adds an exit after layers 2 and 4 (of, say, 6): the model is the
same `LM` with the same params plus (optionally) a norm and a JEI-DNN gate per exit; teacher-forced calls return
in `aux`:
- `exit_logits_EBTV`: float32 logits of each exit, in `layers` order: by default the shared final norm + LM head
  on that layer's output (LayerSkip), or the exit's own norm (`per_exit_norm`) + the shared head;
- `exit_gates_EBT` (with `gates`): g_e = sigmoid(w_e · h_e + b_e), the JEI-DNN exit gate on the normed exit state.
- `exit_classifier_logits_EBT`, `exit_confidence_EBT` (with `classifier="mamba"`): each exit's DYNAMAX classifier
  (lmx.models.exit_classifier; the model is then an `ExitLM`, whose decode calls also carry its states);
- `layer_keep_LB` (with `layer_dropout` and a "dropout" rng): which rows ran each layer.
The final layer is always the last exit. Losses: `layerskip_loss` (weighted CE over the exits and the final head)
and `jei_loss` (E over the gate-induced exit distribution P(exit at e) = g_e Π_{j<e}(1 − g_j) of CE + λ·cost), each
plus the classifiers' BCE when they exist. LayerSkip's layer dropout (p_l = D(l)·p_max over depth) runs inside the
LM's scanned stack, whose per-layer input is then each row's keep flag.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmx.models import exit_classifier as ec
from lmx.models import lm
from lmx.models.config import ModelConfig, repeating_unit
from lmx.models.exit_classifier import CLASSIFIERS, ExitClassifier, classifier_loss

CONFIDENCE_MEASURES = ("softmax", "state", "gate", "classifier")


@dataclass(frozen=True)
class ExitConfig:
    """layers: exit after this many layers, strictly increasing, each in [1, num_layers) (the full depth is always
    the last exit). per_exit_norm: each exit has its own RMSNorm (else the final norm). gates: a learned exit gate
    per exit (JEI-DNN; the "gate" confidence of early-exit decoding). loss_weight: each exit's CE weight in
    `layerskip_loss`, relative to the final head's 1. layer_dropout: LayerSkip's p_max in [0, 1): in teacher-forced
    calls given a "dropout" rng (the exit losses pass the trainer's), each row skips layer l with probability
    p_l = D(l)·p_max (`layer_dropout_rates`); 0 runs exactly the model without it. classifier: "mamba" adds a
    DYNAMAX exit classifier per exit (`lmx.models.exit_classifier`: a small Mamba-2 block of width classifier_dim,
    a multiple of 4; the "classifier" confidence of early-exit decoding), trained by the exit losses with weight
    classifier_weight."""

    layers: tuple[int, ...]
    per_exit_norm: bool = False
    gates: bool = False
    loss_weight: float = 1.0
    loss: str = "layerskip"  # the SFT loss `exit_loss` gives: "layerskip" or "jei" (needs gates)
    cost_weight: float = 0.1  # JEI-DNN's λ
    layer_dropout: float = 0.0  # LayerSkip's p_max (`layer_dropout_rates`); 0: off
    classifier: str | None = None  # "mamba": DYNAMAX exit classifiers
    classifier_dim: int = 16
    classifier_weight: float = 1.0

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
        if not 0 <= self.layer_dropout < 1:  # NaN fails too
            raise ValueError(f"exits.layer_dropout={self.layer_dropout!r} must be in [0, 1) (LayerSkip's p_max)")
        if self.classifier not in (None, *CLASSIFIERS):
            raise ValueError(f"exits.classifier={self.classifier!r} must be None or one of {CLASSIFIERS}")
        dim = self.classifier_dim
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 4 or dim % 4:
            raise ValueError(f"exits.classifier_dim={dim!r} must be a multiple of 4 (>= 4)")
        if not 0 <= self.classifier_weight < float("inf"):
            raise ValueError(f"exits.classifier_weight={self.classifier_weight!r} must be finite and >= 0")
        if self.classifier is None and (dim, self.classifier_weight) != (16, 1.0):
            raise ValueError(f"exits.classifier_dim={dim!r} / classifier_weight={self.classifier_weight!r} are "
                             "options of the exit classifiers (no effect with classifier=None)")


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


def decode_exits(cfg: ModelConfig) -> ExitConfig:
    """lmx.models.lm's hook: early-exit decoding stops at these exits."""
    return check(cfg)


def build(cfg: ModelConfig) -> nn.Module:
    """The LM computes the exit heads itself (its scan emits every layer's output); with exit classifiers, the
    ExitLM, whose decode_forward also advances the classifiers' decode states."""
    check(cfg)
    return lm.LM(cfg) if cfg.exits.classifier is None else ExitLM(cfg)


class ExitLM(lm.LM):
    """The LM with DYNAMAX exit classifiers: teacher-forced calls are the LM's; with a decode state, the layer loop
    runs exit by exit and each exit's classifier advances its state (`lmx.models.exit_classifier`). Its states
    are an ExitDecodeState (a plain DecodeState is converted on the first call); aux also holds the classifiers'
    exit_confidence_EBT for the call's positions."""

    @nn.nowrap
    def decode_forward(self, params, tokens_BT, state, *, positions_BT=None, logits_at_B=None, embeds_BTD=None,
                       use_embeds_BT=None) -> lm.LMOutput:
        """lm.forward's hook (see lmx.models.lm.VARIANTS)."""
        cfg = self.cfg
        lm.check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        lm._check_logits_at(logits_at_B, B, T)
        lm.check_room(state, T)
        state = ec.with_classifiers(cfg, state)
        lost_B = ec.lost_rows(state)
        x_BTD = lm.embed(self, params, tokens_BT, embeds_BTD, use_embeds_BT)
        ctx = lm.make_ctx(state.lengths_B, T, positions_BT)
        bounds = (0, *cfg.exits.layers, cfg.num_layers)
        layers, classifiers, logits = [], [], []
        for e in range(len(bounds) - 1):
            x_BTD, new = lm.run_layers(self, params, x_BTD, state.layers[bounds[e]:bounds[e + 1]], ctx, bounds[e],
                                       bounds[e + 1])
            layers += new
            if e < len(bounds) - 2:
                h_BTD = exit_hidden(cfg, params, e, x_BTD)
                logit_BT, c = ec.classifier_step(cfg, params.rest[f"exit_classifier_{e}"], h_BTD,
                                                 state.classifiers[e], state.lengths_B)
                classifiers.append(c)
                logits.append(logit_BT)
        logits_BTV, h_BTD = lm.head(self, params, x_BTD, logits_at_B)
        new_state = lm.advance(state, tuple(layers), T)
        new_state = new_state.replace(classifiers=tuple(classifiers), overflow_B=new_state.overflow_B | lost_B)
        return lm.LMOutput(logits_BTV, new_state, {"hidden_BTD": h_BTD,
                                                   "exit_confidence_EBT": jax.nn.sigmoid(jnp.stack(logits))})


def exit_hidden(cfg: ModelConfig, params, e: int, x_BTD, exits: ExitConfig | None = None):
    """Exit e of `exits` (default cfg.exits): the normed hidden state of the residual stream x_BTD (the exit's own
    norm or the final one), on split params."""
    name = f"exit_norm_{e}" if (exits or cfg.exits).per_exit_norm else "final_norm"
    return lm._norm(cfg).apply({"params": params.rest[name]}, x_BTD)


def layer_dropout_rates(cfg: ModelConfig) -> np.ndarray:
    """LayerSkip's per-layer dropout rates p_l = D(l)·p_max with D(l) = e^{ln2·l/(L−1)} − 1: 0 at the first layer,
    p_max = exits.layer_dropout at the last, float32 [L]. The paper also scales p_max by a schedule S(t) over
    training steps; lmx keeps it constant, S(t) = 1 (the trainer's loss functions see no step count)."""
    L, p_max = cfg.num_layers, check(cfg).layer_dropout  # exits need L >= 2
    return ((np.exp(np.log(2.0) * np.arange(L) / (L - 1)) - 1.0) * p_max).astype(np.float32)


def layer_keep(cfg: ModelConfig, rng, batch: int):
    """Which rows keep each layer in one layer-dropout draw: bool [L / K, B, K] for the scanned stack's L / K
    repetitions of its K-layer unit (the scan's per-layer input), row b keeping layer l with probability 1 − p_l."""
    unit = len(repeating_unit(cfg.layer_pattern))
    p_UK = layer_dropout_rates(cfg).reshape(-1, 1, unit)
    return jax.random.uniform(rng, (p_UK.shape[0], batch, unit)) >= p_UK


def exit_heads(cfg: ModelConfig, layer_outputs_UBTD, final_norm, project, segment_ids_BT=None) -> dict:
    """The aux entries of the exits (module docstring), called inside LM's compact __call__ (so the per-exit
    norms, gates and classifiers are LM params named exit_norm_{e}, exit_gate_{e}, exit_classifier_{e}).
    layer_outputs_UBTD: the scanned stack's output after each unit; project(h_BTD) -> logits: the LM head (on the
    positions logits_at_B picks); segment_ids_BT: packed sequences (the classifiers reset at their starts)."""
    e = check(cfg)
    u = len(repeating_unit(cfg.layer_pattern))
    logits, gates, classified = [], [], []
    for i, l in enumerate(e.layers):
        h_BTD = (lm._norm(cfg, f"exit_norm_{i}") if e.per_exit_norm else final_norm)(layer_outputs_UBTD[l // u - 1])
        logits.append(project(h_BTD).astype(jnp.float32))
        if e.gates:
            gates.append(gate(nn.Dense(1, dtype=jnp.float32, name=f"exit_gate_{i}")(h_BTD.astype(jnp.float32))))
        if e.classifier is not None:
            classified.append(ExitClassifier(cfg, name=f"exit_classifier_{i}")(h_BTD, segment_ids_BT=segment_ids_BT)[0])
    out = {"exit_logits_EBTV": jnp.stack(logits)}
    if e.gates:
        out["exit_gates_EBT"] = jnp.stack(gates)
    if classified:
        out["exit_classifier_logits_EBT"] = jnp.stack(classified)
        out["exit_confidence_EBT"] = jax.nn.sigmoid(out["exit_classifier_logits_EBT"])
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


def _forward(model, params, batch, rng):
    """Teacher-forced; the loss's rng (None: none) drives layer dropout when the model has it."""
    return model.apply({"params": params}, batch["tokens_BT"], positions_BT=batch.get("positions_BT"),
                       segment_ids_BT=batch.get("segment_ids_BT"), rngs=None if rng is None else {"dropout": rng})


def _extras(model, out, batch) -> tuple[jax.Array, dict]:
    """What layer dropout and the exit classifiers add to an exit loss: (the classifiers' weighted BCE or 0,
    metrics: layers_dropped per row; classifier_bce and exit_agreement)."""
    loss, metrics = jnp.float32(0), {}
    keep_LB = out.aux.get("layer_keep_LB")
    if keep_LB is not None:
        metrics["layers_dropped"] = jnp.mean(jnp.sum(~keep_LB, axis=0, dtype=jnp.float32))
    if "exit_classifier_logits_EBT" in out.aux:
        bce, agreement = classifier_loss(out.aux["exit_classifier_logits_EBT"], out.aux["exit_logits_EBTV"],
                                         out.logits_BTV, batch["loss_mask_BT"])
        loss = model.cfg.exits.classifier_weight * bce
        metrics |= {"classifier_bce": bce, "exit_agreement": agreement}
    return loss, metrics


def layerskip_loss(model, params, batch: dict, rng):
    """LayerSkip's early-exit loss, an SFT LossFn: (CE_final + w Σ_e CE_e) / (1 + w E), token means over the
    batch's loss mask (sft's shift convention), w = exits.loss_weight; with exit classifiers, plus their weighted
    BCE (`lmx.models.exit_classifier.classifier_loss`). Metrics: ce_exit{e} per exit, ce_final; layers_dropped
    (per row) with layer dropout; classifier_bce and exit_agreement with classifiers. rng: the trainer's step key,
    for layer dropout."""
    out = _forward(model, params, batch, rng)
    mask_BT = batch["loss_mask_BT"][:, 1:].astype(jnp.float32)
    denom = jnp.maximum(mask_BT.sum(), 1.0)
    ce_E = jax.vmap(lambda l: (_token_ce(l, batch["tokens_BT"]) * mask_BT).sum() / denom)(_all_logits(out))
    w, E = model.cfg.exits.loss_weight, ce_E.shape[0] - 1
    extra, metrics = _extras(model, out, batch)
    loss = (ce_E[-1] + w * ce_E[:-1].sum()) / (1 + w * E) + extra
    return loss, {"tokens": mask_BT.sum(), "ce_final": ce_E[-1], **metrics,
                  **{f"ce_exit{l}": ce_E[i] for i, l in enumerate(model.cfg.exits.layers)}}


def make_jei_loss(cost_weight: float):
    """JEI-DNN's loss (arXiv 2310.09163), an SFT LossFn: per target token, E_{e ~ P(exit)}[CE_e + λ·depth_e / L]
    with P from the gates (`exit_distribution`), λ = cost_weight; the exit heads train through CE_e and the gates
    through P. Needs ExitConfig(gates=True). Exit classifiers, layer dropout: as in `layerskip_loss`. Metrics:
    expected_depth (layers), ce_final (and layerskip_loss's extras)."""
    lam = float(cost_weight)
    if not 0 <= lam < float("inf"):
        raise ValueError(f"cost_weight={cost_weight!r} must be finite and >= 0")

    def loss_fn(model, params, batch, rng):
        e = model.cfg.exits
        if not e.gates:
            raise ValueError("the JEI-DNN loss needs exit gates: ModelConfig.exits = ExitConfig(..., gates=True)")
        out = _forward(model, params, batch, rng)
        mask_BT = batch["loss_mask_BT"][:, 1:].astype(jnp.float32)
        denom = jnp.maximum(mask_BT.sum(), 1.0)
        ce_EBT = jax.vmap(lambda l: _token_ce(l, batch["tokens_BT"]))(_all_logits(out))
        p_EBT = exit_distribution(out.aux["exit_gates_EBT"])[:, :, :-1]
        depth_E = jnp.asarray([*e.layers, model.cfg.num_layers], jnp.float32)
        per_BT = (p_EBT * (ce_EBT + lam * depth_E[:, None, None] / model.cfg.num_layers)).sum(0)
        expected_depth = ((p_EBT * depth_E[:, None, None]).sum(0) * mask_BT).sum() / denom
        extra, metrics = _extras(model, out, batch)
        return (per_BT * mask_BT).sum() / denom + extra, {
            "tokens": mask_BT.sum(), "expected_depth": expected_depth,
            "ce_final": (ce_EBT[-1] * mask_BT).sum() / denom, **metrics}

    return loss_fn


def exit_loss(exits: ExitConfig):
    """The SFT LossFn of a model with these exits: LayerSkip's, or JEI-DNN's with λ = exits.cost_weight."""
    return layerskip_loss if exits.loss == "layerskip" else make_jei_loss(exits.cost_weight)
