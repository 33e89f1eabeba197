"""The SFT loop shared by experiments, notebooks and the demo: config in, trained params + metrics out.

Run directory layout: config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/<step>/, eval_samples.jsonl.
Step k means "after k updates": metrics.jsonl's step k logs the k-th update, checkpoint k holds the state
after it. Batch k depends only on (cfg.seed, k), so resuming from checkpoint k replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from lmx.data import CharTokenizer, batches, get_task
from lmx.models import ModelConfig, build, preset
from lmx.models.early_exit import ExitConfig, exit_loss
from lmx.models.parscale import ParScaleConfig
from lmx.models.recursive import RecursionConfig
from lmx.sharding import make_mesh
from lmx.train.checkpoint import Checkpointer
from lmx.train.metrics import MetricsWriter, read_metrics, truncate_jsonl
from lmx.train.optim import OptimConfig, lr_schedule, make_optimizer
from lmx.train.sft import evaluate, make_train_step, sft_loss
from lmx.train.state import TrainState, abstract_state

ATTENTION_FIELDS = {f.name for f in dataclasses.fields(ModelConfig().attention)}
SAMPLES_FILE = "eval_samples.jsonl"
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"attention"}
VARIANT_CONFIGS = {"exits": ExitConfig, "parscale": ParScaleConfig, "recursion": RecursionConfig}


@dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, Any]]  # every record of run_dir/metrics.jsonl, earlier (resumed) runs included
    eval: dict[str, Any] | None  # the last evaluation of this call (None if none ran)

    @property
    def params(self):
        return self.state.params


def model_config(cfg_model, vocab_size: int) -> ModelConfig:
    """`cfg.model`: a preset name plus overrides of ModelConfig / AttentionConfig fields (None = keep the
    preset's value). The vocabulary always comes from the tokenizer. `impl` (lmx.pallas's kernel switch:
    "xla" | "auto" | "pallas") sets the attention's and a Mamba-2 SSM's alike (Mamba-3 has no kernel)."""
    overrides = {k: v for k, v in as_dict(cfg_model).items() if k != "preset" and v is not None}
    unknown = set(overrides) - MODEL_FIELDS - ATTENTION_FIELDS
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}; known: "
                         f"{sorted(MODEL_FIELDS | ATTENTION_FIELDS)}")
    base = preset(cfg_model.get("preset", "llama-tiny"))
    attn = dataclasses.replace(base.attention, **{k: v for k, v in overrides.items() if k in ATTENTION_FIELDS})
    top = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if k in MODEL_FIELDS}
    for name, v in top.items():  # a variant given as a dict (config files, config.json) becomes its config class
        if name in VARIANT_CONFIGS and isinstance(v, dict | ml_collections.ConfigDict):
            top[name] = VARIANT_CONFIGS[name](**as_dict(v))
    if top.get("num_layers", base.num_layers) != base.num_layers and "layer_pattern" not in top:
        # The preset's pattern has the preset's depth; a uniform one is re-derived for the new depth.
        if len(set(base.layer_pattern)) > 1:
            raise ValueError(f"config.model.num_layers={top['num_layers']} changes the depth of preset "
                             f"{cfg_model.get('preset')!r}, whose layer_pattern is mixed: set layer_pattern too")
        top["layer_pattern"] = base.layer_pattern[:1] * top["num_layers"]
    cfg = base.replace(**{**top, "attention": attn, "vocab_size": vocab_size})
    if "impl" in overrides and cfg.ssm is not None and cfg.ssm.variant == "mamba2":
        cfg = cfg.replace(ssm=dataclasses.replace(cfg.ssm, impl=overrides["impl"]))
    return cfg


def load_run(run_dir, vocab_size: int, what: str = "run"):
    """(the run's config, model, params) from a `train` run directory: its config.json and latest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    rcfg = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    model = build(model_config(rcfg.model, vocab_size))
    optimizer = make_optimizer(OptimConfig.from_dict(as_dict(rcfg.optim)))
    with Checkpointer(run_dir / "checkpoints", every=1, keep=None) as ckpt:
        restored = ckpt.restore_latest(abstract_state(model, optimizer))
        if restored is None:
            raise FileNotFoundError(f"no checkpoint under {run_dir / 'checkpoints'}")
        logging.info("%s: %s step %d", what, run_dir, ckpt.latest_step())
    return rcfg, model, restored[0].params


def optim_config(cfg) -> OptimConfig:
    return OptimConfig.from_dict(as_dict(cfg.optim))


def as_dict(d) -> dict:
    return d.to_dict() if hasattr(d, "to_dict") else dict(d)


# Cached so that repeated `train` calls in one process (resume, notebooks, tests) reuse one optimizer
# object and hence the compiled init and step programs, which are keyed on it.
cached_optimizer = functools.lru_cache(maxsize=8)(make_optimizer)


def run_setup(cfg):
    """What an SFT or RL run config builds first: (tokenizer, task, model config, model, optim config, optimizer)."""
    tok = CharTokenizer()
    task = get_task(cfg.task.name, **as_dict(cfg.task.get("kwargs", {})))
    model_cfg = model_config(cfg.model, tok.vocab_size)
    opt_cfg = optim_config(cfg)
    return tok, task, model_cfg, build(model_cfg), opt_cfg, cached_optimizer(opt_cfg)


@functools.lru_cache(maxsize=8)
def _train_step(model_cfg: ModelConfig, opt_cfg: OptimConfig, mesh):
    loss_fn = sft_loss if model_cfg.exits is None else exit_loss(model_cfg.exits)  # exits train with their loss
    return make_train_step(build(model_cfg), cached_optimizer(opt_cfg), mesh, loss_fn=loss_fn,
                           lr_fn=lr_schedule(opt_cfg))


def write_config(cfg, run_dir: Path, resume_step: int):
    """config.json is written once; a resumed run with a different config keeps it and writes its own."""
    text = cfg.to_json(indent=2, sort_keys=True) if hasattr(cfg, "to_json") else json.dumps(cfg, indent=2)
    path = run_dir / "config.json"
    if not path.exists():
        path.write_text(text)
    elif path.read_text() != text:
        other = run_dir / f"config.resumed_at_{resume_step}.json"
        other.write_text(text)
        logging.warning("config differs from %s (resuming at step %d); wrote %s", path, resume_step, other)


def check_finite(metrics, step: int, ckpt, what: str) -> dict[str, float]:
    """The step's loss, grad_norm and param_norm as floats; a non-finite one stops the run (before it saves),
    naming the last good checkpoint. A finite loss can still produce non-finite params (e.g. a huge step), so
    those are checked too."""
    guard = {k: float(metrics[k]) for k in ("loss", "grad_norm", "param_norm")}
    if not all(map(math.isfinite, guard.values())):
        good = ckpt.latest_step()
        values = ", ".join(f"{k}={v}" for k, v in guard.items())
        raise FloatingPointError(
            f"non-finite {what} step {step}: {values}. The run stopped without saving this state; "
            f"last good checkpoint: {'none' if good is None else f'step {good} in {ckpt.directory}'}")
    return guard


def is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(cfg: ml_collections.ConfigDict, run_dir: str | Path, *, mesh=None, stop_at: int | None = None,
          batch_hook: Callable[[int, dict], dict] | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume training) as `cfg` says, writing everything under `run_dir`.

    mesh: default `make_mesh(**cfg.mesh)`; a one-device mesh means plain jit without shardings.
    stop_at: stop after this many steps without a final save, as if the job were killed (the schedule
      still follows cfg.train.steps).
    batch_hook(step, batch) -> batch: may edit a batch before its update (tests use it to inject NaNs).
    Raises FloatingPointError, saving nothing, when the loss, gradient norm or updated-parameter norm is
    not finite; earlier checkpoints stay as they were.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    total = int(tc.steps)
    tok, task, model_cfg, model, opt_cfg, optimizer = run_setup(cfg)
    if mesh is None:
        mesh = make_mesh(**as_dict(cfg.get("mesh", {})))
    if mesh.size == 1:
        mesh = None  # one device: plain jit, no sharding annotations to resolve

    with contextlib.ExitStack() as stack:  # closes (and waits for pending checkpoint writes) on any exit
        ckpt = stack.enter_context(
            Checkpointer(run_dir / "checkpoints", every=int(tc.ckpt_every), keep=int(tc.keep_checkpoints)))
        restored = ckpt.restore_latest(abstract_state(model, optimizer, mesh))
        if restored is None:
            state, start = TrainState.create(model, optimizer, jax.random.PRNGKey(cfg.seed), mesh), 0
        else:
            state, data_pos = restored
            start = int(data_pos["data_step"])
            logging.info("resuming %s from step %d", run_dir, start)
        write_config(cfg, run_dir, start)

        train_step = _train_step(model_cfg, opt_cfg, mesh)
        data = batches(task, tok, int(tc.batch_size), int(tc.seq_len), seed=int(cfg.seed), start_step=start)
        ev = cfg.eval
        # A fixed eval set, drawn from a stream apart from the training batches (those use [seed, step]).
        eval_problems = task.sample(np.random.default_rng([int(ev.seed), 1 << 20]), int(ev.num_problems))
        end = total if stop_at is None else min(stop_at, total)
        writer = stack.enter_context(MetricsWriter(run_dir, resume_step=start))
        truncate_jsonl(run_dir / SAMPLES_FILE, start)
        bar = stack.enter_context(tqdm(total=total, initial=start, desc="sft", disable=not progress,
                                       dynamic_ncols=True))
        last_eval = None
        for step in range(start + 1, end + 1):
            batch = next(data)
            if batch_hook is not None:
                batch = batch_hook(step, batch)
            state, metrics = train_step(state, batch)
            guard = check_finite(metrics, step, ckpt, "training")
            record = {}
            if is_due(step, int(tc.log_every), total):
                record.update(jax.device_get(metrics))
            if is_due(step, int(tc.eval_every), total) and int(ev.num_problems) > 0:
                last_eval = evaluate(model, state.params, task, tok, eval_problems, int(ev.max_new_tokens),
                                     int(ev.batch_size))
                record.update({f"eval/{k}": v for k, v in last_eval.items() if k != "samples"})
                _write_samples(run_dir, step, last_eval["samples"][: int(ev.samples_logged)])
            if record:
                writer.write(step, record)
            ckpt.save(step, state, {"data_step": step}, force=step == total)
            bar.update(1)
            bar.set_postfix(loss=f"{guard['loss']:.4f}", refresh=False)
    return TrainResult(state=state, history=read_metrics(run_dir), eval=last_eval)


def _write_samples(run_dir: Path, step: int, samples: list[dict]):
    with (run_dir / SAMPLES_FILE).open("a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
