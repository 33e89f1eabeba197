"""Distill a tiny transformer teacher into a hybrid / pure-SSM student on arithmetic CoT; report both
models' exact-answer accuracy and greedy decode tokens/s on the same held-out prompts.

python -m experiments.distill [--config=experiments/configs/distill.py] [--teacher_dir=runs/quickstart/<t>]
    [--config.teacher.steps=300] [--config.student.steps=300] [--config.student.model.preset=mamba2-tiny]

Without --teacher_dir the teacher is trained first (the quickstart config, `cfg.teacher`) into
<run_dir>/teacher, which a later run can pass as --teacher_dir. Writes runs/distill/<timestamp>/:
config.json, metrics.jsonl (student), tb/, checkpoints/ (student, final), report.md, loss.png.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from lmx.data import CharTokenizer, batches, get_task, held_out_problems, prompt_batch
from lmx.decoding import Greedy, generate
from lmx.models import build
from lmx.train.checkpoint import Checkpointer
from lmx.train.loop import as_dict, load_run, model_config, train
from lmx.train.metrics import MetricsWriter, read_metrics
from lmx.train.optim import OptimConfig, lr_schedule, make_optimizer
from lmx.train.report import quiet_orbax, write_report
from lmx.train.sft import evaluate, make_distill_loss, make_train_step
from lmx.train.state import TrainState

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/distill.py", "Distillation config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/distill/<timestamp>).")
_TEACHER_DIR = flags.DEFINE_string("teacher_dir", None, "A quickstart / sft run directory whose latest "
                                   "checkpoint is the teacher (default: train one first).")


def train_student(cfg, run_dir: Path, model, teacher_model, teacher_params, task, tok):
    """The distillation loop: each batch gets the teacher's logits (its own jitted forward), then one
    student update with the KL (+ CE) loss. Returns the final TrainState."""
    sc = cfg.student
    opt_cfg = OptimConfig.from_dict(as_dict(sc.optim))
    optimizer = make_optimizer(opt_cfg)
    step_fn = make_train_step(model, optimizer, None, make_distill_loss(float(sc.temperature), float(sc.ce_weight)),
                              lr_fn=lr_schedule(opt_cfg))

    @jax.jit
    def teacher_logits(params, batch):
        return teacher_model.apply({"params": params}, batch["tokens_BT"], positions_BT=batch.get("positions_BT"),
                                   segment_ids_BT=batch.get("segment_ids_BT")).logits_BTV

    state = TrainState.create(model, optimizer, jax.random.PRNGKey(int(sc.seed)))
    data = batches(task, tok, int(sc.batch_size), int(sc.seq_len), seed=int(sc.seed))
    total = int(sc.steps)
    with MetricsWriter(run_dir, resume_step=0) as writer, \
            tqdm(total=total, desc="distill", dynamic_ncols=True) as bar:
        for step in range(1, total + 1):
            batch = next(data)
            batch = {**batch, "teacher_logits_BTV": teacher_logits(teacher_params, batch)}
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite distillation loss at step {step}: {loss}")
            if step == total or step % int(sc.log_every) == 0:
                writer.write(step, jax.device_get(metrics))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    with Checkpointer(run_dir / "checkpoints", every=max(total, 1), keep=1) as ckpt:
        ckpt.save(total, state, {"data_step": total}, force=True)
    return state


def decode_speed(models: dict, prompts, max_new_tokens: int, eos_id: int, rounds: int) -> dict[str, dict]:
    """Greedy decode tokens/s of each (model, params) on the same prompts: one warm-up call each
    (compilation), then `rounds` rounds with the models interleaved; median seconds per round.
    Tokens counted: generated tokens up to and including eos, summed over the batch."""
    def run(model, params):
        t0 = time.perf_counter()
        gen = generate(model, params, prompts, max_new_tokens=max_new_tokens, sampler=Greedy(),
                       stop_tokens=(eos_id,))
        lengths = np.asarray(jax.block_until_ready(gen.lengths_BR))
        return time.perf_counter() - t0, int(lengths.sum())

    for model, params in models.values():
        run(model, params)
    times = {name: [] for name in models}
    tokens = {}
    for _ in range(rounds):
        for name, (model, params) in models.items():
            dt, tokens[name] = run(model, params)
            times[name].append(dt)
    out = {}
    for name in models:
        sec = statistics.median(times[name])
        out[name] = {"tokens": tokens[name], "seconds": sec, "tokens_per_s": tokens[name] / sec}
    return out


def _num_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    cfg = _CONFIG.value
    run_dir = Path(_WORKDIR.value or Path("runs/distill") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json(indent=2, sort_keys=True))
    tok = CharTokenizer()
    t0 = time.time()

    if _TEACHER_DIR.value:
        teacher_dir = Path(_TEACHER_DIR.value)
        tcfg, teacher_model, teacher_params = load_run(teacher_dir, tok.vocab_size, what="teacher")
    else:
        teacher_dir, tcfg = run_dir / "teacher", cfg.teacher
        result = train(tcfg, teacher_dir)
        teacher_model, teacher_params = build(model_config(tcfg.model, tok.vocab_size)), result.params
    teacher_min = (time.time() - t0) / 60

    task = get_task(tcfg.task.name, **as_dict(tcfg.task.get("kwargs", {})))
    student_cfg = model_config(cfg.student.model, tok.vocab_size)
    student = build(student_cfg)
    t1 = time.time()
    state = train_student(cfg, run_dir, student, teacher_model, teacher_params, task, tok)
    student_min = (time.time() - t1) / 60

    ev = cfg.eval
    streams = [(tcfg.train.batch_size, tcfg.seed, tcfg.train.steps),
               (cfg.student.batch_size, cfg.student.seed, cfg.student.steps)]
    problems, drawn = held_out_problems(task, streams, int(ev.held_out), int(ev.seed))
    args = (task, tok, problems, int(ev.max_new_tokens), int(ev.batch_size))
    ev_teacher = evaluate(teacher_model, teacher_params, *args)
    ev_student = evaluate(student, state.params, *args)
    speed = decode_speed({"teacher": (teacher_model, teacher_params), "student": (student, state.params)},
                         prompt_batch(tok, problems[: int(ev.batch_size)]), int(ev.max_new_tokens), tok.eos_id,
                         int(ev.speed_rounds))
    minutes = (time.time() - t0) / 60

    kinds = lambda c: "+".join(f"{c.layer_pattern.count(k)}×{k}" for k in dict.fromkeys(c.layer_pattern))
    tm = teacher_model.cfg
    summary = {
        "teacher": {"accuracy": ev_teacher["accuracy"], "gen_tokens": ev_teacher["gen_tokens"],
                    "params": _num_params(teacher_params), **speed["teacher"]},
        "student": {"accuracy": ev_student["accuracy"], "gen_tokens": ev_student["gen_tokens"],
                    "params": _num_params(state.params), **speed["student"]},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    s, t = summary["student"], summary["teacher"]
    notes = [
        f"teacher: {teacher_dir} ({kinds(tm)}, d_model {tm.d_model}, {t['params']:,} params), "
        f"held-out accuracy {t['accuracy']:.3f}, mean generated tokens {t['gen_tokens']:.1f}",
        f"student: preset {cfg.student.model.preset} ({kinds(student_cfg)}, d_model {student_cfg.d_model}, "
        f"{s['params']:,} params), {int(cfg.student.steps)} steps, τ={float(cfg.student.temperature)}, "
        f"ce_weight={float(cfg.student.ce_weight)}: held-out accuracy {s['accuracy']:.3f} "
        f"(the evaluation above is the student's)",
        f"greedy decode on {min(len(problems), int(ev.batch_size))} held-out prompts, max_new_tokens "
        f"{int(ev.max_new_tokens)}, {jax.devices()[0].platform}, median of {int(ev.speed_rounds)} interleaved "
        f"rounds after a warm-up: teacher {t['tokens_per_s']:.0f} tokens/s ({t['tokens']} tokens, "
        f"{t['seconds']:.3f} s), student {s['tokens_per_s']:.0f} tokens/s ({s['tokens']} tokens, "
        f"{s['seconds']:.3f} s); student/teacher {s['tokens_per_s'] / t['tokens_per_s']:.2f}×",
        f"held-out set: {len(problems)} problems whose prompts occur in neither training stream "
        f"({drawn - len(problems)} of {drawn} drawn candidates were seen or repeated)",
        f"wall time: {teacher_min:.1f} min teacher ({'restored' if _TEACHER_DIR.value else 'trained'}), "
        f"{student_min:.1f} min student, {minutes:.1f} min in all",
    ]
    write_report(run_dir, read_metrics(run_dir), ev_student,
                 title=f"Distillation: transformer → {cfg.student.model.preset}", notes=notes)
    print(json.dumps({"run_dir": str(run_dir), "minutes": round(minutes, 2), **summary}))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
