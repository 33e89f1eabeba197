"""Efficient-reasoning RL study (issue 10 item 9): does a length-aware reward cut generated tokens at equal accuracy?

python -m experiments.efficient_rl [--config=experiments/configs/efficient_rl.py] [--workdir=runs/efficient_rl/<t>]
    [--config.init_from=<an SFT run dir>] [--config.only=grpo,kimi] [--config.train.steps=60]

Trains one SFT run (or reuses `init_from`), then runs every entry of `cfg.runs` with `lmx.train.rl_train.train_rl`
from that checkpoint with the same seed (so the same prompts, rollout seeds and held-out set). A run whose reward
the trainer cannot compute (unregistered, or needing inputs it does not supply: budgets, reference statistics) is
skipped with the reason. Writes <workdir>/: config.json, sft/, one directory per run, summary.json, report.md,
accuracy_vs_tokens.png and training.png. Re-running with the same --workdir resumes (finished runs re-evaluate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lmx.data import CharTokenizer, get_task
from lmx.data.tasks import format_target
from lmx.train import rewards as rw
from lmx.train.loop import as_dict, train, write_config
from lmx.train.report import pyplot, quiet_orbax, sample_rows, write_report
from lmx.train.rl_train import (
    make_reward_fn,
    needs_reference_stats,
    parse_reward_spec,
    rl_config,
    sft_config,
    train_rl,
)

FLAGS = flags.FLAGS


def define_flags():
    """--config and --workdir, defined only when run as a script: the tests import several studies in one process,
    and absl refuses a flag defined twice."""
    config_flags.DEFINE_config_file("config", "experiments/configs/efficient_rl.py", "Study config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory (default runs/efficient_rl/<timestamp>).")


NOT_LENGTH_TERMS = ("correctness", "format")  # a reward with any other term is length-aware


def _reference_gen(tok, completions_BR: list[list[str]], T: int) -> SimpleNamespace:
    """A stand-in for a `Generation` (tokens_BRT, lengths_BR) holding the given completion texts, each + stop."""
    ids_BR = [[[*tok.encode(c), tok.eos_id] for c in row] for row in completions_BR]
    T = max(T, *(len(ids) for row in ids_BR for ids in row))
    tokens_BRT = np.full((len(ids_BR), len(ids_BR[0]), T), tok.pad_id, np.int32)
    lengths_BR = np.zeros(tokens_BRT.shape[:2], np.int32)
    for b, row in enumerate(ids_BR):
        for r, ids in enumerate(row):
            tokens_BRT[b, r, : len(ids)], lengths_BR[b, r] = ids, len(ids)
    return SimpleNamespace(tokens_BRT=tokens_BRT, lengths_BR=lengths_BR)


def _total(out) -> np.ndarray:
    """A reward_fn's output as one [B, R] array (LEAD returns its two streams)."""
    return sum(np.asarray(x) for x in out) if isinstance(out, tuple) else np.asarray(out)


def _probe_kwargs(terms, budget, gen, problems, task, tok) -> dict:
    """make_reward_fn's keyword inputs as the trainer supplies them for reference completions: the mid budget
    when cfg.budget is on, and O1-Pruner's reference statistics (here: the probe group's own means)."""
    kw = {}
    if budget and int(budget.get("max", 0)):
        kw["budgets_B"] = np.full(len(problems), (int(budget["min"]) + int(budget["max"])) / 2, np.float32)
    if needs_reference_stats(terms):
        texts = [[tok.decode(gen.tokens_BRT[b, r, : gen.lengths_BR[b, r]].tolist()) for r in range(
            gen.lengths_BR.shape[1])] for b in range(len(problems))]
        acc = rw.score_completions(task, problems, texts).mean(1)
        kw["reference"] = lambda: (gen.lengths_BR.mean(1).astype(np.float32), acc)
    return kw


def reward_blocker(task, tok, reward: str, reward_kwargs=None, budget=None) -> str | None:
    """Why the trainer cannot run reward spec `reward` (None: it can). Runs the trainer's own reward function on
    reference completions with the inputs the run's config makes the trainer supply (budgets, reference stats)."""
    try:
        terms = parse_reward_spec(reward, reward_kwargs)
    except ValueError as e:
        return str(e)
    problems = task.sample(np.random.default_rng(0), 2)
    gen = _reference_gen(tok, [[format_target(p)] * 2 for p in problems], 0)
    try:
        make_reward_fn(task, tok, problems, terms, [], **_probe_kwargs(terms, budget, gen, problems, task, tok))(gen)
    except ValueError as e:
        return str(e)
    return None


def trace_reward_gap(task, tok, reward: str, group_size: int, max_new_tokens: int, n: int = 16,
                     reward_kwargs=None, budget=None) -> float | None:
    """Mean reward of a short trace minus a full one, within all-correct groups of G reference completions mixed
    as the SFT data is (round(G·short_frac) short ones, at least one of each): which trace the reward prefers
    before any training (its sign is what group-normalised advantages act on). None unless cot="mixed"."""
    if getattr(task, "cot", None) != "mixed":
        return None
    k = min(max(round(group_size * task.short_frac), 1), group_size - 1)
    problems = task.sample(np.random.default_rng(2), n)
    groups = [[format_target(task.make(p.meta["a"], p.meta["b"], p.meta["op"], "short" if r < k else "full"))
               for r in range(group_size)] for p in problems]
    terms = parse_reward_spec(reward, reward_kwargs)
    gen = _reference_gen(tok, groups, max_new_tokens)
    fn = make_reward_fn(task, tok, problems, terms, [], **_probe_kwargs(terms, budget, gen, problems, task, tok))
    total_BR = _total(fn(gen))
    return float(total_BR[:, :k].mean() - total_BR[:, k:].mean())


def run_config(cfg, name: str, sft_dir: Path, task_cfg, model_cfg) -> ConfigDict:
    """The train_rl config of run `name`: shared sections from cfg, loss/reward from cfg.runs[name]."""
    r = cfg.runs[name]
    return ConfigDict({
        "seed": int(cfg.seed), "init_from": str(sft_dir), "task": as_dict(task_cfg), "model": as_dict(model_cfg),
        "loss": r.loss, "loss_kwargs": as_dict(r.loss_kwargs), "advantage": r.advantage,
        "advantage_kwargs": as_dict(r.advantage_kwargs), "reward": r.reward, "rl": as_dict(cfg.rl),
        "reward_kwargs": as_dict(r.get("reward_kwargs", {})), "budget": as_dict(r.get("budget", {})),
        "train": as_dict(cfg.train), "optim": as_dict(cfg.optim), "eval": as_dict(cfg.eval)})


def trace_lengths(task, tok, n: int = 256) -> dict[str, float] | None:
    """Mean completion tokens (think + answer + stop) and CoT tokens of the full and the short trace of a
    cot="mixed" arithmetic task: the most a switch to the short trace can save. None for other tasks."""
    if getattr(task, "cot", None) != "mixed":
        return None
    out = {}
    for form in ("full", "short"):
        ps = [task.make(p.meta["a"], p.meta["b"], p.meta["op"], form) for p in task.sample(np.random.default_rng(1), n)]
        out[f"{form}_tokens"] = float(np.mean([len(tok.encode(format_target(p))) + 1 for p in ps]))
        out[f"{form}_cot_tokens"] = float(np.mean([len(tok.encode(p.cot)) for p in ps]))
    return out


def _eval_row(ev: dict, traces: dict | None) -> dict:
    row = {k: float(ev[k]) for k in ("accuracy", "gen_tokens", "cot_tokens")}
    if traces:  # a greedy completion whose CoT is nearer the short trace's length counts as short
        mid = (traces["full_cot_tokens"] + traces["short_cot_tokens"]) / 2
        row["short_trace_frac"] = float(np.mean([s["cot_tokens"] < mid for s in ev["samples"]]))
    return row


def selected_runs(cfg) -> list[str]:
    """The names of cfg.runs to run, the baseline first."""
    names = list(cfg.runs.keys())
    if cfg.only:
        wanted = {n.strip() for n in str(cfg.only).split(",") if n.strip()}
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"config.only names unknown runs {sorted(unknown)}; config.runs has {names}")
        names = [n for n in names if n in wanted or n == cfg.baseline]
    if cfg.baseline not in names:
        raise ValueError(f"config.baseline={cfg.baseline!r} is not in config.runs ({names})")
    return [cfg.baseline] + [n for n in names if n != cfg.baseline]


def _first_last(steps: list[dict], key: str, k: int = 5) -> list[float]:
    return [float(np.mean([h[key] for h in part])) for part in (steps[:k], steps[-k:])]


def _run_one(cfg, name, workdir, sft_dir, sft_cfg, task, tok, traces, progress):
    """(summary row, RLResult or None) of run `name`: skipped when the trainer cannot compute its reward."""
    r = cfg.runs[name]
    overrides = as_dict(r.get("reward_kwargs", {}))
    shown = r.reward + (f" {json.dumps(overrides, sort_keys=True)}" if overrides else "")
    if r.get("budget") and int(r.budget.get("max", 0)):
        shown += f" budget {int(r.budget.min)}-{int(r.budget.max)} '{r.budget.template}'"
    row = {"name": name, "loss": r.loss, "advantage": r.advantage, "reward": shown,
           "length_aware": any(t.strip().rpartition("*")[2] not in NOT_LENGTH_TERMS for t in r.reward.split("+"))}
    extra = {"reward_kwargs": r.get("reward_kwargs"), "budget": r.get("budget")}
    blocker = reward_blocker(task, tok, r.reward, **extra)
    if blocker:
        logging.warning("skipping run %r (reward %r): %s", name, r.reward, blocker)
        return {**row, "status": "skipped", "reason": blocker}, None
    run_cfg = run_config(cfg, name, sft_dir, sft_cfg.task, sft_cfg.model)
    row["advantage"] = rl_config(run_cfg, tok.eos_id).advantage  # the trainer's choice (a `lead` reward: "lead")
    logging.info("run %s: loss %s, advantage %s, reward %s", name, r.loss, row["advantage"], r.reward)
    t0 = time.time()
    try:
        result = train_rl(run_cfg, workdir / name, progress=progress)
    except FloatingPointError as e:  # a diverged run is a result too; the others still run
        return {**row, "status": "failed", "reason": str(e)}, None
    steps = [h for h in result.history if "reward_mean" in h]
    return {**row, "status": "ok", **_eval_row(result.eval, traces), "wall_minutes": (time.time() - t0) / 60,
            "sample_accuracy_first_last": _first_last(steps, "accuracy"),
            "sample_tokens_first_last": _first_last(steps, "completion_len_mean"),
            "frac_reward_zero_std": float(np.mean([h["frac_reward_zero_std"] for h in steps])),
            "short_minus_full_reward": trace_reward_gap(task, tok, r.reward, int(cfg.rl.group_size),
                                                        int(cfg.rl.max_new_tokens), **extra),
            "run_dir": str(workdir / name)}, result


def run_study(cfg, workdir: str | Path, progress: bool = True) -> dict:
    """Train the SFT run and every RL run of cfg; write summary.json, report.md and the plots; return the summary."""
    if int(cfg.eval.num_problems) < 1:
        raise ValueError(f"config.eval.num_problems={cfg.eval.num_problems}: the study compares held-out evaluations")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, workdir, 0)  # written once: a re-run with another config keeps it and writes its own
    t_start, cpu_start = time.time(), time.process_time()
    tok = CharTokenizer()

    if cfg.init_from:  # the SFT run defines the task and the model
        sft_dir = Path(cfg.init_from)
        if not (sft_dir / "config.json").exists():
            raise FileNotFoundError(f"config.init_from={cfg.init_from!r} is not an SFT run directory (no config.json)")
        sft_cfg = ConfigDict(json.loads((sft_dir / "config.json").read_text()))
        sft_minutes = None
    else:
        sft_dir, sft_cfg = workdir / "sft", sft_config(cfg)
        t0 = time.time()
        sft = train(sft_cfg, sft_dir, progress=progress)
        sft_minutes = (time.time() - t0) / 60
        write_report(sft_dir, sft.history, None, title="SFT", notes=[f"wall time: {sft_minutes:.1f} min"])
    task = get_task(sft_cfg.task.name, **as_dict(sft_cfg.task.get("kwargs", {})))
    traces = trace_lengths(task, tok)

    rows, histories, samples, init = [], {}, {}, None
    for name in selected_runs(cfg):
        row, result = _run_one(cfg, name, workdir, sft_dir, sft_cfg, task, tok, traces, progress)
        rows.append(row)
        if name == cfg.baseline and row["status"] != "ok":
            raise RuntimeError(f"the baseline run {name!r} was {row['status']}: {row['reason']}")
        if result is not None:
            histories[name], samples[name] = result.history, result.eval["samples"][:3]
            if init is None and result.init_eval is not None:
                init = _eval_row(result.init_eval, traces)
    if init is None:  # every run was resumed: the baseline's logged step-0 evaluation (no samples kept)
        first = next(h for h in histories[cfg.baseline] if h["step"] == 0 and "eval/accuracy" in h)
        init = {k: first[f"eval/{k}"] for k in ("accuracy", "gen_tokens", "cot_tokens")}

    base = rows[0]
    cut, points = float(cfg.target.token_cut), float(cfg.target.accuracy_points)
    for row in rows:
        if row["status"] == "ok":
            row["token_change_pct"] = 100 * (row["gen_tokens"] / base["gen_tokens"] - 1)
            row["accuracy_change_points"] = 100 * (row["accuracy"] - base["accuracy"])
            row["meets_target"] = bool(row is not base and row["length_aware"]
                                       and row["gen_tokens"] <= (1 - cut) * base["gen_tokens"]
                                       and row["accuracy_change_points"] >= -points)
    meeting = [r["name"] for r in rows if r.get("meets_target")]
    summary = {
        "workdir": str(workdir), "baseline": base["name"],
        "sft": {"run_dir": str(sft_dir), "trained_here": not cfg.init_from, "wall_minutes": sft_minutes,
                **(init or {})},
        "trace_lengths": traces, "runs": rows,
        "target": {"token_cut": cut, "accuracy_points": points, "met": bool(meeting), "runs_meeting": meeting},
        "eval_problems": int(cfg.eval.num_problems),
        "wall_minutes_total": (time.time() - t_start) / 60, "cpu_minutes_total": (time.process_time() - cpu_start) / 60,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_accuracy_vs_tokens(workdir / "accuracy_vs_tokens.png", summary)
    plot_training(workdir / "training.png", histories, _colors(summary))
    write_study_report(workdir / "report.md", summary, sft_cfg, cfg, samples)
    return summary


def _fmt(x, spec: str, signed: bool = False) -> str:
    return "–" if x is None else format(x, ("+" if signed else "") + spec)


def verdict_text(summary: dict) -> str:
    t, base = summary["target"], summary["runs"][0]
    ok = [r for r in summary["runs"][1:] if r["status"] == "ok" and r["length_aware"]]
    head = (f"**Target**: a length-aware run cuts mean generated tokens by ≥ {100 * t['token_cut']:.0f}% against "
            f"`{base['name']}` ({base['gen_tokens']:.1f} tokens, accuracy {base['accuracy']:.3f}) at held-out "
            f"accuracy within {t['accuracy_points']:g} point of it. ")
    if not ok:
        return head + "**Not measured**: no length-aware run finished."
    parts = [f"`{r['name']}` {r['token_change_pct']:+.0f}% tokens, {r['accuracy_change_points']:+.1f} points "
             f"({'meets' if r['meets_target'] else 'misses'})" for r in ok]
    verdict = (f"**Met** by {', '.join(f'`{n}`' for n in t['runs_meeting'])}" if t["met"] else "**Not met**")
    why = []
    if summary.get("trace_lengths"):
        tl = summary["trace_lengths"]
        why.append(f"the short trace is {100 * (1 - tl['short_tokens'] / tl['full_tokens']):.0f}% shorter than the "
                   f"full one ({tl['short_tokens']:.1f} vs {tl['full_tokens']:.1f} tokens), so moving every greedy "
                   "completion to it is the whole available cut; the share of greedy completions using it is "
                   + ", ".join(f"{r['name']} {r['short_trace_frac']:.2f}" for r in [base, *ok]))
    gaps = [r for r in [base, *ok] if r.get("short_minus_full_reward") is not None]
    if gaps:
        why.append("the reward of a short minus a full correct trace in a group mixed like the SFT data is "
                   + ", ".join(f"{r['name']} {r['short_minus_full_reward']:+.3f}" for r in gaps)
                   + " (a run moves to the short trace only where this is > 0)")
    a0, a1 = base["sample_tokens_first_last"]
    why.append(f"`{base['name']}` had zero-variance reward groups (no gradient) in "
               f"{100 * base['frac_reward_zero_std']:.0f}% of its groups, and its sampled completions went from "
               f"{a0:.1f} to {a1:.1f} tokens (first vs last 5 steps)")
    return head + verdict + ": " + "; ".join(parts) + ". Why: " + "; ".join(why) + "."


def write_study_report(path: Path, summary: dict, sft_cfg, cfg, samples: dict):
    sft, runs = summary["sft"], summary["runs"]
    lines = [f"# Efficient-reasoning RL study (`{Path(summary['workdir']).name}`)", "",
             f"- task: {sft_cfg.task.name} {json.dumps(as_dict(sft_cfg.task.get('kwargs', {})))}; model "
             f"{json.dumps(as_dict(sft_cfg.model))}",
             f"- SFT: {int(sft_cfg.train.steps)} steps of batch {int(sft_cfg.train.batch_size)} "
             f"(`{sft['run_dir']}`, " + (f"trained here, {sft['wall_minutes']:.1f} min)" if sft["trained_here"]
                                          else "reused)"),
             f"- RL: {int(cfg.train.steps)} steps of B={int(cfg.rl.batch_size)} prompts × G={int(cfg.rl.group_size)} "
             f"samples (τ={float(cfg.rl.temperature):g}, ≤ {int(cfg.rl.max_new_tokens)} new tokens), lr "
             f"{float(cfg.optim.lr):g}, seed {int(cfg.seed)}, every run from the same SFT checkpoint; reward terms "
             "with their registered default configs unless the reward column names overrides; L1 runs put their "
             "budget in the prompt",
             f"- held-out evaluation: {summary['eval_problems']} problems unseen in SFT and RL, greedy, exact "
             "verifier; generated tokens count think + answer + stop",
             f"- wall time {summary['wall_minutes_total']:.1f} min, CPU time {summary['cpu_minutes_total']:.1f} min "
             "(wall times are from a shared machine and pessimistic)", "",
             "| run | loss (advantage) | reward | held-out accuracy | mean generated tokens | CoT tokens | "
             "short-trace share | tokens vs baseline | accuracy vs baseline (points) | reward short − full | "
             "wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if "accuracy" in sft:
        lines.append(f"| sft (initial policy) | – | – | {sft['accuracy']:.3f} | {sft['gen_tokens']:.1f} | "
                     f"{sft['cot_tokens']:.1f} | {_fmt(sft.get('short_trace_frac'), '.2f')} | – | – | – | "
                     f"{_fmt(sft['wall_minutes'], '.1f')} |")
    for r in runs:
        if r["status"] != "ok":
            continue
        loss = r["loss"] + ("" if r["advantage"] == "group_normalized" else f" ({r['advantage']})")
        lines.append(f"| {r['name']} | {loss} | `{r['reward']}` | {r['accuracy']:.3f} | {r['gen_tokens']:.1f} | "
                     f"{r['cot_tokens']:.1f} | {_fmt(r.get('short_trace_frac'), '.2f')} | "
                     f"{_fmt(r['token_change_pct'], '.1f', True)}% | "
                     f"{_fmt(r['accuracy_change_points'], '.1f', True)} | "
                     f"{_fmt(r.get('short_minus_full_reward'), '.3f', True)} | {r['wall_minutes']:.1f} |")
    lines += ["", verdict_text(summary), ""]
    skipped = [r for r in runs if r["status"] != "ok"]
    if skipped:
        lines += ["## Runs not measured", ""]
        lines += [f"- `{r['name']}` (`{r['reward']}`), {r['status']}: {r['reason']}" for r in skipped]
        lines.append("")
    lines += ["![accuracy vs tokens](accuracy_vs_tokens.png)", "", "![training](training.png)", "",
              "## Greedy samples (the first held-out problems)", "", "| run | prompt | completion | score |",
              "|---|---|---|---|"]
    lines += sample_rows(samples)
    path.write_text("\n".join(lines) + "\n")


def _colors(summary: dict) -> dict[str, str]:
    """One colour per run, the same in both plots."""
    return {r["name"]: f"C{i}" for i, r in enumerate(summary["runs"])}


def plot_accuracy_vs_tokens(path: Path, summary: dict):
    """One point per finished run (and the SFT policy), with the target region relative to the baseline."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ok = [r for r in summary["runs"] if r["status"] == "ok"]
    base, t, colors = ok[0], summary["target"], _colors(summary)
    ax.axvspan(0, (1 - t["token_cut"]) * base["gen_tokens"], color="tab:green", alpha=0.08)
    ax.axhline(base["accuracy"] - t["accuracy_points"] / 100, color="tab:green", ls="--", lw=1,
               label=f"target: ≥ {100 * t['token_cut']:.0f}% fewer tokens (shaded), "
                     f"≤ {t['accuracy_points']:g} pt lower")
    if "accuracy" in summary["sft"]:
        ax.scatter(summary["sft"]["gen_tokens"], summary["sft"]["accuracy"], marker="s", s=90, facecolors="none",
                   edgecolors="k", zorder=2, label="sft (initial policy)")
    for r in ok:  # the legend carries the values: runs often land on one point
        ax.scatter(r["gen_tokens"], r["accuracy"], color=colors[r["name"]], zorder=3, alpha=0.8,
                   label=f"{r['name']} ({r['gen_tokens']:.1f}, {r['accuracy']:.3f})")
    ax.set(xlabel="mean generated tokens (held-out, greedy)", ylabel="held-out accuracy", title="accuracy vs tokens",
           xlim=(0, 1.15 * max(r["gen_tokens"] for r in ok)))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(path: Path, histories: dict[str, list[dict]], colors: dict[str, str], window: int = 5):
    """Sample accuracy and completion length per RL step (moving average over `window` steps; τ-sampled
    rollouts), with each run's held-out greedy evaluations (step 0 and the last step) as markers."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        steps = [h for h in history if "reward_mean" in h]
        evals = [h for h in history if "eval/accuracy" in h]
        for ax, key, eval_key in ((axes[0], "accuracy", "eval/accuracy"),
                                  (axes[1], "completion_len_mean", "eval/gen_tokens")):
            y = np.asarray([h[key] for h in steps], float)
            if y.size:
                k = min(window, y.size)
                ax.plot([h["step"] for h in steps][k - 1:], np.convolve(y, np.ones(k) / k, "valid"),
                        color=colors[name], label=name)
            ax.scatter([h["step"] for h in evals], [h[eval_key] for h in evals], color=colors[name], marker="x")
    axes[0].set(xlabel="RL step", ylabel="accuracy", title=f"sample accuracy ({window}-step mean), held-out greedy (x)")
    axes[1].set(xlabel="RL step", ylabel="tokens", title=f"completion tokens ({window}-step mean), held-out greedy (x)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    workdir = Path(FLAGS.workdir or Path("runs/efficient_rl") / time.strftime("%Y%m%d-%H%M%S"))
    summary = run_study(FLAGS.config, workdir)
    for r in summary["runs"]:
        if r["status"] == "ok":
            print(f"{r['name']:>16}: accuracy {r['accuracy']:.3f}, {r['gen_tokens']:.1f} tokens "
                  f"({r['token_change_pct']:+.1f}%), {r['wall_minutes']:.1f} min")
        else:
            print(f"{r['name']:>16}: {r['status']}")
    print(json.dumps({"workdir": str(workdir), "target_met": summary["target"]["met"],
                      "runs_meeting": summary["target"]["runs_meeting"],
                      "wall_minutes": round(summary["wall_minutes_total"], 2)}))
    print(f"report: {workdir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
