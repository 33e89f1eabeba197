"""`make demo`: the efficient-reasoning pipeline on a CPU in minutes (issue 11 item 8).

python -m experiments.pipeline [--config=experiments/configs/pipeline.py] [--workdir=runs/pipeline/<t>]
    [--config.train.steps=100] [--config.tts.k=16]

1. SFT on a CoT task whose answers have a long and a short trace (the SFT policy prefers the long one);
2. RL from it with a length-aware reward (`cfg.runs.rl`: GRPO on correctness + Kimi's length reward);
3. evaluation of both policies on one held-out set (unseen in SFT and RL): greedy, majority@k and short-m@k,
   with accuracy, generated and thinking tokens, eFLOPs (`lmx.decoding.cost`) and cost-of-pass per problem.
Writes <workdir>/: config.json, sft/, rl/, summary.json, report.md, accuracy_vs_tokens.png, training.png.
Re-running with the same --workdir resumes the training runs (a finished one only re-evaluates).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import efficient_rl as study
from lmx.data import prompt_batch
from lmx.decoding import cost
from lmx.decoding.sampling import Sampler
from lmx.decoding.scaling import run_method
from lmx.train.loop import run_setup, train, write_config
from lmx.train.report import pyplot, quiet_orbax, write_report
from lmx.train.rl_train import rl_held_out, sft_config, train_rl

FLAGS = flags.FLAGS
POLICIES = ("sft", "rl")  # before and after RL


def define_flags():
    """--config and --workdir, only when run as a script (tests import the module)."""
    config_flags.DEFINE_config_file("config", "experiments/configs/pipeline.py", "Pipeline config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (default runs/pipeline/<timestamp>).")


def thinking_tokens(tok, completion: str) -> int:
    """Tokens strictly inside the completion's <think> block (to the end when unclosed): what a budget counts."""
    ids = tok.encode(completion)
    if tok.think_id not in ids:
        return 0
    i = ids.index(tok.think_id) + 1
    return (ids.index(tok.end_think_id, i) if tok.end_think_id in ids[i:] else len(ids)) - i


def evaluate_policy(cfg, model, params, tok, task, problems) -> list[dict]:
    """Greedy, majority@k and short-m@k for each m of cfg.tts.m on `problems`: one row each, costs per problem over
    every sample."""
    t, B = cfg.tts, len(problems)
    prompts, k = prompt_batch(tok, problems), int(t.k)
    rows = []
    for name, label, kk, mm in (("greedy", "greedy", 1, None), ("majority", f"majority@{k}", k, None),
                                *(("short_m_at_k", f"short-{int(m)}@{k}", k, int(m)) for m in t.m)):
        t0 = time.time()
        res = run_method(name, model, params, prompts, k=kk, m=mm, tok=tok, task=task, problems=problems,
                         sampler=Sampler(float(t.temperature)), rng=jax.random.key(int(cfg.seed)),
                         max_new_tokens=int(cfg.eval.max_new_tokens))
        think = [thinking_tokens(tok, c) for row in res.completions_BR for c in row]
        acc, eflops = float(res.accuracy), cost.eflops(res.stats, str(t.hardware)) / B
        rows.append({"method": label, "k": kk, "m": mm, "accuracy": acc,
                     "gen_tokens": res.stats["tokens_generated"] / B, "think_tokens": float(np.sum(think)) / B,
                     "eflops": eflops, "cost_of_pass_eflops": cost.cost_of_pass(eflops, acc),
                     "seconds": time.time() - t0,
                     "samples": [{"prompt": p.prompt, "completion": res.completions_BR[b][max(int(c), 0)],
                                  "score": float(res.task_scores_B[b])}
                                 for b, (p, c) in enumerate(zip(problems, res.chosen_B, strict=True))
                                 if b < int(t.samples_shown)]})
    return rows


def run_pipeline(cfg, workdir: str | Path, progress: bool = True) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, workdir, 0)
    t_start = time.time()
    sft_dir, sft_cfg = workdir / "sft", sft_config(cfg)
    t0 = time.time()
    sft = train(sft_cfg, sft_dir, progress=progress)
    sft_minutes = (time.time() - t0) / 60
    write_report(sft_dir, sft.history, None, title="SFT", notes=[f"wall time: {sft_minutes:.1f} min"])
    rl_cfg = study.run_config(cfg, "rl", sft_dir, sft_cfg.task, sft_cfg.model)
    t0 = time.time()
    rl = train_rl(rl_cfg, workdir / "rl", progress=progress)
    rl_minutes = (time.time() - t0) / 60
    tok, task, _, model, _, _ = run_setup(rl_cfg)
    problems = rl_held_out(rl_cfg, workdir / "rl")
    t0 = time.time()
    evals = {name: evaluate_policy(cfg, model, params, tok, task, problems)
             for name, params in zip(POLICIES, (sft.params, rl.params), strict=True)}
    summary = {
        "workdir": str(workdir), "task": {"name": sft_cfg.task.name, **dict(sft_cfg.task.kwargs)},
        "model": dict(sft_cfg.model), "sft_steps": int(sft_cfg.train.steps), "rl_steps": int(rl_cfg.train.steps),
        "reward": str(cfg.runs.rl.reward), "loss": str(cfg.runs.rl.loss), "held_out": len(problems),
        "tts": dict(cfg.tts), "trace_lengths": study.trace_lengths(task, tok),
        "policies": {name: [{k: v for k, v in r.items() if k != "samples"} for r in rows]
                     for name, rows in evals.items()},
        "minutes": {"sft": sft_minutes, "rl": rl_minutes, "eval": (time.time() - t0) / 60,
                    "total": (time.time() - t_start) / 60},
    }
    summary["headlines"] = headlines(summary)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_accuracy_vs_tokens(workdir / "accuracy_vs_tokens.png", summary)
    study.plot_training(workdir / "training.png", {"rl": rl.history}, {"rl": "C0"})
    write_pipeline_report(workdir / "report.md", summary, {n: [r["samples"] for r in rows] for n, rows in
                                                            evals.items()})
    return summary


def _row(summary, policy, method_prefix):
    return next(r for r in summary["policies"][policy] if r["method"].startswith(method_prefix))


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.0f}%" if ref > 0 else "–"


def headlines(summary: dict) -> list[str]:
    """What the numbers say, computed from them (nothing asserted in advance)."""
    out = []
    for a, b in zip(summary["policies"]["sft"], summary["policies"]["rl"], strict=True):
        out.append(f"{a['method']}: RL moves accuracy {a['accuracy']:.3f} → {b['accuracy']:.3f} and generated "
                   f"tokens per problem {a['gen_tokens']:.1f} → {b['gen_tokens']:.1f} "
                   f"({_pct(b['gen_tokens'], a['gen_tokens'])}), thinking tokens {a['think_tokens']:.1f}"
                   f" → {b['think_tokens']:.1f}, cost of a pass {a['cost_of_pass_eflops']:.3g} → "
                   f"{b['cost_of_pass_eflops']:.3g} eFLOPs.")
    for policy in POLICIES:
        maj = _row(summary, policy, "majority")
        for short in (r for r in summary["policies"][policy] if r["method"].startswith("short")):
            out.append(f"{policy}: {short['method']} vs {maj['method']}: accuracy {short['accuracy']:.3f} vs "
                       f"{maj['accuracy']:.3f}, thinking tokens {short['think_tokens']:.1f} vs "
                       f"{maj['think_tokens']:.1f} ({_pct(short['think_tokens'], maj['think_tokens'])}).")
    return out


def write_pipeline_report(path: Path, summary: dict, samples: dict):
    s, t, mins = summary, summary["tts"], summary["minutes"]
    tl = s["trace_lengths"]
    lines = [f"# Efficient-reasoning pipeline (`{Path(s['workdir']).name}`)", "",
             f"- task: {json.dumps(s['task'])}" + (f"; the full trace is {tl['full_tokens']:.1f} completion tokens, "
                                                   f"the short one {tl['short_tokens']:.1f}" if tl else ""),
             f"- model: {json.dumps(s['model'])}",
             f"- SFT {s['sft_steps']} steps ({mins['sft']:.1f} min), then RL {s['rl_steps']} steps of `{s['loss']}` "
             f"with reward `{s['reward']}` ({mins['rl']:.1f} min)",
             f"- held-out: {s['held_out']} problems unseen in SFT and RL; majority@k and short-m@k sample k = "
             f"{t['k']} at τ = {t['temperature']:g} (short-m@k: m ∈ {list(t['m'])}, each problem stops once m "
             "finished); "
             f"eFLOPs at {t['hardware']} (`lmx.decoding.cost`); cost of a pass = eFLOPs / accuracy; tokens count "
             f"everything generated, all k samples",
             f"- wall time {mins['total']:.1f} min (evaluation {mins['eval']:.1f} min)", "",
             "| policy | method | accuracy | generated tokens / problem | thinking tokens / problem | "
             "eFLOPs / problem | cost of a pass (eFLOPs) |", "|---|---|---|---|---|---|---|"]
    for policy in POLICIES:
        lines += [f"| {policy} | {r['method']} | {r['accuracy']:.3f} | {r['gen_tokens']:.1f} | {r['think_tokens']:.1f} "
                  f"| {r['eflops']:.3g} | {r['cost_of_pass_eflops']:.3g} |" for r in s["policies"][policy]]
    lines += ["", "## What we see", "", *[f"- {h}" for h in s["headlines"]], "",
              "![accuracy vs tokens](accuracy_vs_tokens.png)", "", "![RL training](training.png)", "",
              "## Sample generations (the first held-out problems; the chosen sample)", "",
              "| policy | method | prompt | completion | score |", "|---|---|---|---|---|"]
    for policy in POLICIES:
        for row, shown in zip(s["policies"][policy], samples[policy], strict=True):
            for x in shown:
                cells = [x["prompt"], x["completion"]]
                lines.append(f"| {policy} | {row['method']} | " + " | ".join(
                    f"`{c}`".replace("|", "\\|") for c in cells) + f" | {x['score']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot_accuracy_vs_tokens(path: Path, summary: dict):
    """One marker per (policy, method); an arrow per method from before to after RL."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    before, after = summary["policies"]["sft"], summary["policies"]["rl"]
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        ax.annotate("", xy=(b["gen_tokens"], b["accuracy"]), xytext=(a["gen_tokens"], a["accuracy"]),
                    arrowprops={"arrowstyle": "->", "color": f"C{i}", "alpha": 0.6})
        ax.scatter(a["gen_tokens"], a["accuracy"], color=f"C{i}", marker="s", facecolors="none",
                   label=f"{a['method']}, SFT")
        ax.scatter(b["gen_tokens"], b["accuracy"], color=f"C{i}", marker="o", label=f"{b['method']}, after RL")
    ax.set(xscale="log", xlabel="generated tokens per problem (all samples)", ylabel="held-out accuracy",
           title="before → after RL")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: points crowd the corners
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    workdir = Path(FLAGS.workdir or Path("runs/pipeline") / time.strftime("%Y%m%d-%H%M%S"))
    summary = run_pipeline(FLAGS.config, workdir)
    for h in summary["headlines"]:
        print(h)
    print(json.dumps({"workdir": str(workdir), "minutes": round(summary["minutes"]["total"], 2)}))
    print(f"report: {workdir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
