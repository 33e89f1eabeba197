"""Supervised fine-tuning: token losses, the jitted train step, and greedy evaluation on a task.

Loss convention (shared with lmx.data.batching): `mask_BT[t] = 1` marks token t as a prediction target;
the logits at position t-1 predict it. Losses take the un-shifted token sequence and mask and do the
shift themselves, so callers never slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lmx.sharding import DEFAULT_RULES, batch_sharding, replicated, use_mesh
from lmx.train.state import TrainState, state_shardings

Metrics = dict[str, jax.Array]
# loss_fn(model, params, batch, rng) -> (scalar loss, metrics); `batch` is the dict the loop feeds in.
LossFn = Callable[[nn.Module, Any, dict, jax.Array], tuple[jax.Array, Metrics]]


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT) -> tuple[jax.Array, Metrics]:
    """Next-token cross-entropy, averaged over target tokens.

    targets_BT is the token sequence the logits were computed from: logits_BTV[:, t] is scored against
    targets_BT[:, t+1] wherever mask_BT[:, t+1] is set. Returns (loss, {tokens, token_accuracy})."""
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    targets_BT, mask_BT = targets_BT[:, 1:], mask_BT[:, 1:].astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    tokens = mask_BT.sum()
    denom = jnp.maximum(tokens, 1.0)  # an all-masked batch gives loss 0, not NaN
    loss = ((logz_BT - target_logit_BT) * mask_BT).sum() / denom
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    return loss, {"tokens": tokens, "token_accuracy": (correct_BT * mask_BT).sum() / denom}


def distill_loss(student_logits_BTV, teacher_logits_BTV, mask_BT, temperature: float = 1.0
                 ) -> tuple[jax.Array, Metrics]:
    """Forward KL(teacher ‖ student) of the temperature-softened next-token distributions, times τ²
    (Hinton et al. 2015, so gradients keep their scale as τ changes), token-mean over the mask.
    Same shift convention as `masked_cross_entropy`: mask_BT[t] selects the logits at t-1."""
    s_BTV = student_logits_BTV[:, :-1].astype(jnp.float32) / temperature
    t_BTV = teacher_logits_BTV[:, :-1].astype(jnp.float32) / temperature
    mask_BT = mask_BT[:, 1:].astype(jnp.float32)
    log_p_BTV = jax.nn.log_softmax(t_BTV, axis=-1)
    log_q_BTV = jax.nn.log_softmax(s_BTV, axis=-1)
    kl_BT = (jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV)).sum(-1)
    tokens = mask_BT.sum()
    loss = (kl_BT * mask_BT).sum() / jnp.maximum(tokens, 1.0) * temperature**2
    return loss, {"tokens": tokens}


def _forward(model: nn.Module, params, batch: dict):
    """Teacher-forced logits; packed batches carry segment_ids_BT / positions_BT."""
    return model.apply({"params": params}, batch["tokens_BT"], positions_BT=batch.get("positions_BT"),
                       segment_ids_BT=batch.get("segment_ids_BT")).logits_BTV


def sft_loss(model: nn.Module, params, batch: dict, rng) -> tuple[jax.Array, Metrics]:
    del rng  # deterministic forward; the argument is there for losses that sample (dropout, RL)
    return masked_cross_entropy(_forward(model, params, batch), batch["tokens_BT"], batch["loss_mask_BT"])


def make_distill_loss(temperature: float = 1.0, ce_weight: float = 0.0) -> LossFn:
    """Distillation LossFn: reads precomputed `teacher_logits_BTV` from the batch (the teacher runs in
    its own jitted call, so its params are not baked into the student's program). Total loss is
    KL + ce_weight · CE on the data tokens."""

    def loss_fn(model, params, batch, rng):
        del rng
        logits_BTV = _forward(model, params, batch)
        kl, metrics = distill_loss(logits_BTV, batch["teacher_logits_BTV"], batch["loss_mask_BT"], temperature)
        ce, ce_metrics = masked_cross_entropy(logits_BTV, batch["tokens_BT"], batch["loss_mask_BT"])
        return kl + ce_weight * ce, {**metrics, "kl": kl, "ce": ce, "token_accuracy": ce_metrics["token_accuracy"]}

    return loss_fn


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
                    loss_fn: LossFn = sft_loss, *, lr_fn: optax.Schedule | None = None, rules=DEFAULT_RULES,
                    micro_batches: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted; the input state is donated (do not reuse
    it). With a mesh, the state keeps the shardings of `state_shardings`, batch arrays are split over
    (data, fsdp) along their leading axis, metrics are replicated. Metrics: the loss_fn's, plus loss,
    grad_norm (before clipping), param_norm (after the update), lr (when `lr_fn` is given: the rate used
    for this update).

    micro_batches > 1: gradient accumulation. The batch's arrays are split along their leading axis into that many
    slices, run one after another (lax.scan: one slice's activations live at a time), and the losses and
    gradients are SUMMED — so loss_fn must return each slice's share of the whole-batch loss (the RL policy loss
    does, given the batch's 0-d `num_tokens` / `num_seqs` entries, which every slice sees whole). The loss_fn's
    metrics are averaged over the slices (those named `*_max`: the max)."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be an int >= 1")

    def grads_of(params, batch, step_rng):
        grad_fn = jax.value_and_grad(partial(loss_fn, model), has_aux=True)
        if micro_batches == 1:
            return grad_fn(params, batch, step_rng)
        k = micro_batches
        for name, x in batch.items():
            if jnp.ndim(x) and x.shape[0] % k:
                raise ValueError(f"micro_batches={k} does not divide batch[{name!r}]'s {x.shape[0]} rows")
        whole = {n: x for n, x in batch.items() if not jnp.ndim(x)}
        parts = {n: x.reshape(k, x.shape[0] // k, *x.shape[1:]) for n, x in batch.items() if jnp.ndim(x)}

        def body(grads, inp):
            i, part = inp
            (loss, metrics), g = grad_fn(params, {**part, **whole}, jax.random.fold_in(step_rng, i))
            return jax.tree.map(jnp.add, grads, g), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (loss_k, metrics_k) = jax.lax.scan(body, zeros, (jnp.arange(k), parts))
        metrics = {n: v.max(0) if n.endswith("_max") else v.mean(0) for n, v in metrics_k.items()}
        return (loss_k.sum(), metrics), grads

    def step_fn(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        (loss, metrics), grads = grads_of(state.params, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        if lr_fn is not None:
            metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        return TrainState(params, opt_state, state.step + 1, rng), metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    shardings = state_shardings(model, optimizer, mesh, rules)
    jitted = jax.jit(step_fn, donate_argnums=0, in_shardings=(shardings, batch_sharding(mesh)),
                     out_shardings=(shardings, replicated(mesh)))

    def train_step(state, batch):
        with use_mesh(mesh, rules):  # logical constraints inside the model resolve at trace time
            return jitted(state, batch)

    return train_step


def _count_between(tokens, start_id: int, end_id: int) -> int:
    """Tokens strictly between the first `start_id` and the next `end_id` (or the end)."""
    tokens = list(tokens)
    if start_id not in tokens:
        return 0
    i = tokens.index(start_id) + 1
    j = tokens.index(end_id, i) if end_id in tokens[i:] else len(tokens)
    return j - i


def evaluate(model: nn.Module, params, task, tok, problems: Sequence, max_new_tokens: int, batch_size: int = 64
             ) -> dict[str, Any]:
    """Greedy generation (stop at eos) scored by `task.score`.

    Returns accuracy (mean score), gen_tokens (mean tokens generated, eos included), cot_tokens (mean
    tokens between <think> and </think>; to the end when unclosed), and `samples`: one dict per problem
    with prompt, completion (text before eos), answer, score, gen_tokens, cot_tokens."""
    from lmx.data import prompt_batch
    from lmx.decoding import Greedy, generate

    if not problems:
        raise ValueError("evaluate needs at least one problem")
    samples = []
    for i in range(0, len(problems), batch_size):
        chunk = list(problems[i:i + batch_size])
        prompts = prompt_batch(tok, chunk)
        prompts += [prompts[-1]] * (batch_size - len(chunk))  # a fixed batch size: one compiled program
        gen = generate(model, params, prompts, max_new_tokens=max_new_tokens, sampler=Greedy(),
                       stop_tokens=(tok.eos_id,))
        tokens_BT = np.asarray(gen.tokens_BRT[:, 0])
        lengths_B = np.asarray(gen.lengths_BR[:, 0])
        for problem, row, n in zip(chunk, tokens_BT, lengths_B, strict=False):
            row = row[: int(n)].tolist()
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id) + 1]
            text = tok.decode(row[:-1] if row and row[-1] == tok.eos_id else row)
            samples.append({"prompt": problem.prompt, "completion": text, "answer": problem.answer,
                            "score": float(task.score(problem, text)), "gen_tokens": len(row),
                            "cot_tokens": _count_between(row, tok.think_id, tok.end_think_id)})
    mean = lambda key: float(np.mean([s[key] for s in samples]))
    return {"accuracy": mean("score"), "gen_tokens": mean("gen_tokens"), "cot_tokens": mean("cot_tokens"),
            "samples": samples}
