"""Relaxed Recursive Transformer study (issue 12 item 4): a trained L-layer model converted to K unique layers +
per-depth LoRA, its accuracy right after conversion and after uptraining, against the original and same-size
vanilla models.

python -m experiments.recursive [--config=experiments/configs/recursive.py] [--workdir=runs/recursive/<t>]
    [--config.recursion.lora_ranks='(0,8)'] [--config.uptrain.steps=200]

1. SFT an L-layer model (`lmx.train.loop.train`, under <workdir>/base) on `cfg.base.train.steps` batches.
2. For each rank r of `cfg.recursion.lora_ranks`: `lmx.models.recursive.from_base` (the K unique layers are the
   means of their tied layers, depth l's LoRA the rank-r truncated SVD of W_l − W′), evaluate, then uptrain all
   params for `cfg.uptrain.steps` on the batches that follow the base's (the same for every variant) and evaluate
   again. `lmx.train.loop.train` starts only from a random init or its own checkpoint, so the uptraining loop
   here is built from the pieces `train` uses: `lmx.train.sft.make_train_step`, `TrainState`, `lmx.data.batches`.
3. Same-size vanilla models with K layers: trained from scratch with `train` on all base + uptrain batches, and
   (`cfg.vanilla_first_k`) initialised from the base's first K layers and uptrained like the recursive models.
4. Every model: greedy accuracy and teacher-forced loss on held-out problems (prompts in no training batch),
   `lmx.decoding.cost.param_count`, and decode tokens/s at batch 1.

Writes <workdir>/: config.json, base/ and vanilla_scratch/ (training runs), summary.json, report.md, recursive.png.
Re-running with the same --workdir reuses the finished training runs and redoes the rest.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from tqdm.auto import tqdm

from lmx.data import CharTokenizer, batches, encode_example, get_task, held_out_problems, make_batch, prompt_batch
from lmx.decoding import Greedy, generate
from lmx.decoding.cost import param_count
from lmx.models import build, decode_params
from lmx.models.recursive import RecursionConfig, from_base
from lmx.train.loop import as_dict, cached_optimizer, is_due, model_config, train, write_config
from lmx.train.optim import OptimConfig, lr_schedule
from lmx.train.report import quiet_orbax, write_report
from lmx.train.sft import evaluate, make_train_step, sft_loss
from lmx.train.state import TrainState

FLAGS = flags.FLAGS


def define_flags():
    """--config and --workdir, defined only when run as a script: the tests import several studies in one process,
    and absl refuses a flag defined twice."""
    config_flags.DEFINE_config_file("config", "experiments/configs/recursive.py", "Study config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory (default runs/recursive/<timestamp>).")


def train_config(cfg, num_layers: int, steps: int) -> ConfigDict:
    """The `lmx.train.loop.train` config of a vanilla model with `num_layers` layers trained for `steps` batches of
    the seed's stream: cfg's task, model and seed, cfg.base's train/optim (the schedule stretched to `steps`)."""
    model = {**as_dict(cfg.model), "num_layers": int(num_layers)}
    tc = {**as_dict(cfg.base.train), "steps": int(steps), "ckpt_every": int(steps)}
    optim = {**as_dict(cfg.base.optim), "total_steps": int(steps)}
    return ConfigDict({
        "seed": int(cfg.seed), "task": as_dict(cfg.task), "model": model, "train": tc, "optim": optim,
        "eval": {"num_problems": 0, "batch_size": 1, "max_new_tokens": 1, "seed": 0, "samples_logged": 0},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1}})


def uptrain(model, params, task, tok, cfg, start_step: int, progress: bool = True, desc: str = "uptrain"):
    """(params, loss history) after cfg.uptrain.steps updates of all of `params` (copied: the step donates its
    state) with cfg.uptrain.optim, on the batches start_step, start_step + 1, ... of the seed's SFT stream."""
    uc, tc = cfg.uptrain, cfg.base.train
    steps = int(uc.steps)
    opt_cfg = OptimConfig.from_dict(as_dict(uc.optim))
    optimizer = cached_optimizer(opt_cfg)
    train_step = make_train_step(model, optimizer, None, lr_fn=lr_schedule(opt_cfg))
    params = jax.tree.map(jnp.array, params)
    opt_state = jax.jit(optimizer.init)(params)  # one program, not one per leaf
    state = TrainState(params, opt_state, jnp.zeros((), jnp.int32), jax.random.PRNGKey(int(cfg.seed)))
    data = batches(task, tok, int(tc.batch_size), int(tc.seq_len), seed=int(cfg.seed), start_step=start_step)
    history = []
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True):
        state, metrics = train_step(state, next(data))
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {loss} at uptraining step {step}")
        if is_due(step, int(uc.log_every), steps):
            history.append({"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}})
    return state.params, history


@functools.cache
def _loss_fn(model):
    return jax.jit(functools.partial(sft_loss, model))


def held_out_eval(model, params, task, tok, problems, loss_batch, cfg) -> dict:
    """Greedy accuracy / generated tokens (lmx.train.sft.evaluate) and the teacher-forced loss on the held-out
    problems."""
    ev = evaluate(model, params, task, tok, problems, int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
    loss, _ = _loss_fn(model)(params, loss_batch, None)
    return {"accuracy": ev["accuracy"], "gen_tokens": ev["gen_tokens"], "loss": float(loss),
            "samples": ev["samples"][:3]}


def decode_speeds(models: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s of greedy decoding at batch 1 (prefill + `new_tokens` tokens, no stop token) per model: the params
    split per layer once up front (`decode_params`: a recursive model's per-depth merge; generate's own cache keeps
    only a few params objects, which round-robin timing over more models would evict), one warm-up call each
    (compilation), then `repeats` timed rounds over all models in turn; the median per model."""
    models = {name: (model, decode_params(model, params)) for name, (model, params) in models.items()}

    def run(model, params):
        gen = generate(model, params, [prompt], max_new_tokens=new_tokens, sampler=Greedy())
        return int(jax.block_until_ready(gen.lengths_BR).sum())

    for model, params in models.values():
        run(model, params)
    times = {name: [] for name in models}
    counts = {}
    for _ in range(repeats):
        for name, (model, params) in models.items():
            t0 = time.perf_counter()
            counts[name] = run(model, params)
            times[name].append(time.perf_counter() - t0)
    return {name: counts[name] / float(np.median(ts)) for name, ts in times.items()}


def lora_energy(params: dict) -> float:
    """Σ ‖a_l b_l‖²_F over every relaxed matrix and depth (0 without LoRA)."""
    if "lora" not in params:
        return 0.0
    total = 0.0
    for mod in params["lora"].values():
        for leaf in mod.values():
            if isinstance(leaf, dict):
                total += float(np.sum(np.matmul(np.asarray(leaf["a"], np.float64), np.asarray(leaf["b"], np.float64))
                                      ** 2))
            else:  # a qkv-bias offset
                total += float(np.sum(np.asarray(leaf, np.float64) ** 2))
    return total


def run_study(cfg, workdir: str | Path, progress: bool = True) -> dict:
    """Train the base, convert and uptrain every rank, train the vanilla models; write summary.json, report.md and
    recursive.png; return the summary."""
    if int(cfg.eval.num_problems) < 1:
        raise ValueError(f"config.eval.num_problems={cfg.eval.num_problems}: the study compares held-out evaluations")
    L, K = int(cfg.model.num_layers), int(cfg.recursion.num_unique)
    ranks = [int(r) for r in cfg.recursion.lora_ranks]
    if L % K or K >= L:
        raise ValueError(f"config.recursion.num_unique={K} must divide config.model.num_layers={L} and be smaller")
    if not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0:
        raise ValueError(f"config.recursion.lora_ranks={tuple(cfg.recursion.lora_ranks)} must be distinct ints >= 0")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, workdir, 0)
    t_start, cpu_start = time.time(), time.process_time()
    tok = CharTokenizer()
    task = get_task(cfg.task.name, **as_dict(cfg.task.get("kwargs", {})))
    base_steps, up_steps = int(cfg.base.train.steps), int(cfg.uptrain.steps)

    # 1. The base model.
    t0 = time.time()
    base_run = train(train_config(cfg, L, base_steps), workdir / "base", progress=progress)
    base_minutes = (time.time() - t0) / 60
    write_report(workdir / "base", base_run.history, None, title=f"base: {L}-layer SFT",
                 notes=[f"wall time: {base_minutes:.1f} min"])
    base_cfg = model_config(cfg.model, tok.vocab_size)
    base_model, base_params = build(base_cfg), base_run.params

    # Held-out problems: prompts in none of the batches any model trains on (0 .. base + uptrain steps).
    ec = cfg.eval
    stream = (int(cfg.base.train.batch_size), int(cfg.seed), base_steps + up_steps)
    problems, drawn = held_out_problems(task, [stream], int(ec.num_problems), int(ec.seed))
    loss_batch = make_batch([encode_example(tok, p) for p in problems], int(cfg.base.train.seq_len), tok.pad_id)
    evaluate_ = functools.partial(held_out_eval, task=task, tok=tok, problems=problems, loss_batch=loss_batch, cfg=cfg)

    rows, curves, speed_models, samples = [], {}, {}, {}

    def add(name, kind, model, params, *, unique, rank, steps, init=None, minutes=None, energy=None):
        ev = evaluate_(model, params)
        samples[name] = ev.pop("samples")
        rows.append({"name": name, "kind": kind, "depth": model.cfg.num_layers, "unique_layers": unique,
                     "lora_rank": rank, "params": int(param_count(model.cfg)), "train_steps": steps,
                     "init": init, **ev, "residual_energy_kept": energy, "wall_minutes": minutes})
        speed_models[name] = (model, params)
        logging.info("%s: accuracy %.3f, loss %.4f", name, ev["accuracy"], ev["loss"])

    add("base", "base", base_model, base_params, unique=L, rank=None, steps=base_steps, minutes=base_minutes)

    # The full-rank conversion computes the base's function (a check), and is what rank-r energies are relative to.
    full_cfg, full_params = from_base(base_cfg, base_params, RecursionConfig(K, int(base_cfg.d_model)))
    full_energy = lora_energy(full_params)
    check_rows = loss_batch["tokens_BT"][:8]
    base_logits = base_model.apply({"params": base_params}, check_rows).logits_BTV
    full_logits = build(full_cfg).apply({"params": full_params}, check_rows).logits_BTV
    full_rank_check = {"rank": int(base_cfg.d_model),
                       "max_abs_logit_diff": float(jnp.max(jnp.abs(base_logits - full_logits)))}
    del full_params

    # 2. Convert, evaluate, uptrain, evaluate.
    for r in ranks:
        name = f"recursive_r{r}"
        t0 = time.time()
        rec_cfg, rec_params = from_base(base_cfg, base_params, RecursionConfig(K, r))
        model = build(rec_cfg)
        init = evaluate_(model, rec_params)
        init.pop("samples")
        energy = lora_energy(rec_params) / full_energy if full_energy > 0 else None
        params, curves[name] = uptrain(model, rec_params, task, tok, cfg, base_steps, progress, desc=name)
        add(name, "recursive", model, params, unique=K, rank=r, steps=base_steps + up_steps, init=init,
            minutes=(time.time() - t0) / 60, energy=energy)

    # 3. Same-size vanilla K-layer models.
    if cfg.vanilla_first_k:
        t0 = time.time()
        first_k = {**base_params, "layers": jax.tree.map(lambda w: w[:K], base_params["layers"])}
        model = build(model_config({**as_dict(cfg.model), "num_layers": K}, tok.vocab_size))
        init = evaluate_(model, first_k)
        init.pop("samples")
        params, curves["vanilla_first_k"] = uptrain(model, first_k, task, tok, cfg, base_steps, progress,
                                                    desc="vanilla_first_k")
        add("vanilla_first_k", "vanilla_first_k", model, params, unique=K, rank=None, steps=base_steps + up_steps,
            init=init, minutes=(time.time() - t0) / 60)
    t0 = time.time()
    scratch_cfg = train_config(cfg, K, base_steps + up_steps)
    scratch = train(scratch_cfg, workdir / "vanilla_scratch", progress=progress)
    minutes = (time.time() - t0) / 60
    write_report(workdir / "vanilla_scratch", scratch.history, None, title=f"vanilla: {K}-layer SFT from scratch",
                 notes=[f"wall time: {minutes:.1f} min"])
    curves["vanilla_scratch"] = [h for h in scratch.history if "loss" in h and h["step"] > base_steps]
    add("vanilla_scratch", "vanilla_scratch", build(model_config(scratch_cfg.model, tok.vocab_size)), scratch.params,
        unique=K, rank=None, steps=base_steps + up_steps, minutes=minutes)

    # 4. Decode speed, all models side by side.
    sc = cfg.speed
    speeds = decode_speeds(speed_models, prompt_batch(tok, problems[:1])[0], int(sc.new_tokens), int(sc.repeats))
    base_row = rows[0]
    scratch_row = next(r for r in rows if r["name"] == "vanilla_scratch")
    for row in rows:
        row["decode_tokens_per_s"] = speeds[row["name"]]
        row["accuracy_vs_base_points"] = 100 * (row["accuracy"] - base_row["accuracy"])
        row["accuracy_vs_vanilla_scratch_points"] = 100 * (row["accuracy"] - scratch_row["accuracy"])

    summary = {
        "workdir": str(workdir), "base_layers": L, "unique_layers": K, "lora_ranks": ranks,
        "base_steps": base_steps, "uptrain_steps": up_steps,
        "held_out": {"problems": len(problems), "candidates_drawn": drawn},
        "full_rank_check": full_rank_check, "runs": rows,
        "wall_minutes_total": (time.time() - t_start) / 60,
        "cpu_minutes_total": (time.process_time() - cpu_start) / 60,
    }
    summary["observations"] = observations(summary)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_study(workdir / "recursive.png", summary, curves)
    write_study_report(workdir / "report.md", summary, cfg, samples)
    return summary


def _se_points(p: float, n: int) -> float:
    """Binomial standard error of an accuracy, in points."""
    return 100 * math.sqrt(max(p * (1 - p), 1 / n) / n)


def observations(summary: dict) -> list[str]:
    """What the numbers say, computed from them (no claim written in advance)."""
    rows = {r["name"]: r for r in summary["runs"]}
    n = summary["held_out"]["problems"]
    base, scratch = rows["base"], rows["vanilla_scratch"]
    rec = [r for r in summary["runs"] if r["kind"] == "recursive"]
    L, K, U = summary["base_layers"], summary["unique_layers"], summary["uptrain_steps"]
    noise = 2 * max(_se_points(r["accuracy"], n) for r in summary["runs"])
    out = [f"The {L}-layer base reaches {base['accuracy']:.3f} held-out accuracy (loss {base['loss']:.3f}) after "
           f"{summary['base_steps']} steps. Two binomial standard errors at n = {n} are at most {noise:.1f} points "
           "for the accuracies below: smaller differences are within sampling noise."]
    conv = ", ".join(f"r={r['lora_rank']}: {r['init']['accuracy']:.3f} (loss {r['init']['loss']:.3f}, "
                     f"{100 * (r['residual_energy_kept'] or 0):.0f}% of the layer residuals' energy)" for r in rec)
    out.append(f"Right after conversion to {K} unique layers: {conv}.")
    fr = summary["full_rank_check"]
    out.append(f"Full-rank conversion (r={fr['rank']}) vs the base: max |Δlogit| = {fr['max_abs_logit_diff']:.2e} "
               "on 8 held-out sequences.")
    after = ", ".join(f"r={r['lora_rank']}: {r['accuracy']:.3f} ({r['accuracy_vs_base_points']:+.1f} pt vs base, "
                      f"{r['accuracy_vs_vanilla_scratch_points']:+.1f} pt vs vanilla from scratch)" for r in rec)
    out.append(f"After {U} uptraining steps: {after}; the {K}-layer vanilla model trained from scratch on the same "
               f"{summary['base_steps'] + U} batches reaches {scratch['accuracy']:.3f} (loss {scratch['loss']:.3f}).")
    if len(rec) > 1:
        accs = [r["accuracy"] for r in sorted(rec, key=lambda r: r["lora_rank"])]
        losses = [r["loss"] for r in sorted(rec, key=lambda r: r["lora_rank"])]
        trend = ("rises" if all(b >= a for a, b in zip(accs, accs[1:], strict=False)) else
                 "falls" if all(b <= a for a, b in zip(accs, accs[1:], strict=False)) else "is not monotone")
        out.append(f"Across ranks, uptrained accuracy {trend} with r (spread {100 * (max(accs) - min(accs)):.1f} pt); "
                   f"held-out loss goes {' → '.join(f'{x:.3f}' for x in losses)}.")
    best = max(rec, key=lambda r: (r["accuracy"], -r["loss"]))
    out.append(f"Best recursive variant: r={best['lora_rank']} ({best['accuracy']:.3f}, {best['params']:,} params, "
               f"{best['params'] / base['params']:.2f}× the base's; the vanilla {K}-layer model has "
               f"{scratch['params'] / base['params']:.2f}×).")
    if "vanilla_first_k" in rows:
        fk, r0 = rows["vanilla_first_k"], next((r for r in rec if r["lora_rank"] == 0), None)
        text = (f"The {K}-layer model initialised from the base's first {K} layers starts at "
                f"{fk['init']['accuracy']:.3f} and reaches {fk['accuracy']:.3f} after the same {U} steps")
        if r0 is not None:
            text += f" (the looped r=0 model, same parameter count: {r0['accuracy']:.3f})"
        out.append(text + ".")
    sp = ", ".join(f"r={r['lora_rank']}: {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}×" for r in rec)
    out.append(f"Decode speed at batch 1 relative to the base ({base['decode_tokens_per_s']:.0f} tokens/s): {sp}; "
               f"vanilla {K}-layer: {scratch['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}×. The "
               f"recursive models decode {L} merged layers per token (one KV cache per depth), as the base does.")
    return out


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def write_study_report(path: Path, summary: dict, cfg, samples: dict):
    L, K, U = summary["base_layers"], summary["unique_layers"], summary["uptrain_steps"]
    m = cfg.model
    lines = [
        f"# Relaxed Recursive Transformer: {L} layers → {K} unique + LoRA (`{Path(summary['workdir']).name}`)", "",
        f"- task: `{cfg.task.name}` {json.dumps(as_dict(cfg.task.kwargs))}; model d_model={m.d_model}, "
        f"mlp_dim={m.mlp_dim}, heads {m.num_heads}/{m.num_kv_heads}×{m.head_dim}",
        f"- base: {L} layers, {summary['base_steps']} SFT steps; recursive: `from_base` (K={K} unique layers = means "
        f"of their tied layers, CYCLE sharing; depth l's LoRA = rank-r truncated SVD of W_l − W′, norms folded), "
        f"then {U} uptraining steps of all params on the batches after the base's (the same for every variant)",
        f"- vanilla_scratch: a {K}-layer model trained from scratch on all {summary['base_steps'] + U} batches"
        + (f"; vanilla_first_k: the base's first {K} layers (+ embeddings, final norm, head), uptrained like the "
           "recursive models" if cfg.vanilla_first_k else ""),
        f"- held-out: {summary['held_out']['problems']} problems whose prompts occur in no training batch, greedy "
        f"decoding, exact verifier; loss = teacher-forced CE on their targets",
        f"- decode tokens/s: batch 1, prefill + {cfg.speed.new_tokens} greedy tokens, median of {cfg.speed.repeats} "
        "interleaved calls after a warm-up (this machine's CPU, shared with other jobs: ratios matter, not levels)",
        f"- wall time {summary['wall_minutes_total']:.1f} min (CPU {summary['cpu_minutes_total']:.1f} min)", "",
        "| model | depth | unique layers | LoRA r | params | accuracy at init | loss at init | accuracy | loss | "
        "vs base (pt) | vs vanilla scratch (pt) | decode tok/s | residual energy kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        init = r["init"] or {}
        lines.append(
            f"| {r['name']} | {r['depth']} | {r['unique_layers']} | {_fmt(r['lora_rank'], 'd')} | {r['params']:,} | "
            f"{_fmt(init.get('accuracy'), '.3f')} | {_fmt(init.get('loss'), '.3f')} | {r['accuracy']:.3f} | "
            f"{r['loss']:.3f} | {r['accuracy_vs_base_points']:+.1f} | {r['accuracy_vs_vanilla_scratch_points']:+.1f} | "
            f"{r['decode_tokens_per_s']:.0f} | "
            f"{_fmt(None if r['residual_energy_kept'] is None else 100 * r['residual_energy_kept'], '.0f')}"
            f"{'' if r['residual_energy_kept'] is None else '%'} |")
    lines += ["", "\"at init\": right after conversion (recursive) or truncation (vanilla_first_k), before uptraining. "
              "Residual energy kept: Σ‖a_l b_l‖² of the rank-r LoRA over that of the full-rank one.", "",
              "## What we see", ""]
    lines += [f"- {o}" for o in summary["observations"]]
    lines += ["", "![recursive](recursive.png)", "", "## Greedy samples (the first held-out problems)", "",
              "| model | prompt | completion | score |", "|---|---|---|---|"]
    for name, rows in samples.items():
        for s in rows:
            cells = [s["prompt"], s["completion"], f"{s['score']:.0f}"]
            lines.append(f"| {name} | " + " | ".join(f"`{c}`".replace("|", "\\|") for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot_study(path: Path, summary: dict, curves: dict[str, list[dict]]):
    """Held-out accuracy at init and after uptraining per model; uptraining loss curves; accuracy vs params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    colors = {r["name"]: f"C{i}" for i, r in enumerate(runs)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    x = np.arange(len(runs))
    init = [np.nan if r["init"] is None else r["init"]["accuracy"] for r in runs]
    after = [r["accuracy"] for r in runs]
    ax.bar(x - 0.2, init, 0.4, color="lightgray", edgecolor="k", label="at init (after conversion)")
    ax.bar(x + 0.2, after, 0.4, color=[colors[r["name"]] for r in runs], label="trained / uptrained")
    for xs, ys in ((x - 0.2, init), (x + 0.2, after)):
        for xi, yi in zip(xs, ys, strict=True):
            if not np.isnan(yi):
                ax.text(xi, yi + 0.01, f"{yi:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [r["name"].replace("_", "\n", 1) for r in runs], fontsize=7)
    ax.set(ylabel="held-out accuracy (greedy)", ylim=(0, 1.05), title="accuracy")
    ax.legend(fontsize=7)
    ax = axes[1]
    base_steps = summary["base_steps"]
    for name, hist in curves.items():
        if hist:
            steps = [h["step"] - (base_steps if name == "vanilla_scratch" else 0) for h in hist]
            ax.plot(steps, [h["loss"] for h in hist], color=colors[name], label=name)
    ax.set(xlabel="uptraining step (vanilla_scratch: step − base steps)", ylabel="train loss", yscale="log",
           title="uptraining loss")
    ax.legend(fontsize=7)
    ax = axes[2]
    for r in runs:
        ax.scatter(r["params"], r["accuracy"], color=colors[r["name"]], zorder=3,
                   label=f"{r['name']} ({r['params']:,}, {r['accuracy']:.3f})")
    ax.set(xlabel="parameters", ylabel="held-out accuracy", title="accuracy vs parameters")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    workdir = Path(FLAGS.workdir or Path("runs/recursive") / time.strftime("%Y%m%d-%H%M%S"))
    summary = run_study(FLAGS.config, workdir)
    for r in summary["runs"]:
        init = "" if r["init"] is None else f"init {r['init']['accuracy']:.3f} -> "
        print(f"{r['name']:>16}: {init}accuracy {r['accuracy']:.3f}, loss {r['loss']:.3f}, {r['params']:,} params, "
              f"{r['decode_tokens_per_s']:.0f} tok/s")
    print(json.dumps({"workdir": str(workdir), "wall_minutes": round(summary["wall_minutes_total"], 2)}))
    print(f"report: {workdir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
