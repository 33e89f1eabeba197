"""Early-exit study (issue 12 item 4): does early-exit decoding save wall clock at equal accuracy?

python -m experiments.early_exit [--config=experiments/configs/early_exit.py] [--workdir=runs/early_exit/<t>]

1. SFT a transformer with exits (`cfg.model.exits`) with the LayerSkip loss (`lmx.train.loop.train` picks it);
2. held-out greedy accuracy and mean layers per token of early-exit decoding (`lmx.decoding.early_exit`) for each
   confidence measure and threshold, against full-depth greedy (batched);
3. batch-1 wall clock (each problem alone, after a warm-up, fastest of `repeats` interleaved passes) of full-depth
   greedy, early-exit decoding at each measure's best threshold within the accuracy budget, and self-speculative
   decoding with each exit in `draft_layers` as the draft (exact: its tokens must equal greedy's).
Writes <workdir>/: config.json, sft/, summary.json, report.md, accuracy_vs_layers.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from lmx.data import CharTokenizer, get_task, held_out_problems, prompt_batch
from lmx.decoding import Greedy, SelfDraft, generate, speculative_generate
from lmx.decoding.early_exit import early_exit_generate
from lmx.models import build
from lmx.train.loop import as_dict, model_config, train
from lmx.train.report import quiet_orbax, write_report

FLAGS = flags.FLAGS


def define_flags():
    """--config and --workdir, only when run as a script (tests import the module)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "experiments/configs/early_exit.py", "Study config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory (default runs/early_exit/<timestamp>).")


def _score(task, tok, problems, gen) -> float:
    texts = [tok.decode([t for t in gen.tokens_BRT[b, 0, : gen.lengths_BR[b, 0]].tolist() if t != tok.eos_id])
             for b in range(len(problems))]
    return float(np.mean([task.score(p, t) for p, t in zip(problems, texts, strict=True)]))


def _timed(fns: dict, prompts, repeats: int) -> tuple[dict, dict]:
    """Seconds per problem of each fn([prompt]) over the prompts one at a time, and each fn's outputs. Every fn is
    warmed up (compiled) first; then each pass times every fn in turn, so all see the same machine load, and each
    fn's fastest pass counts."""
    for fn in fns.values():
        jax.block_until_ready(fn(prompts[:1]).tokens_BRT)
    best, outs = dict.fromkeys(fns, float("inf")), {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, outs[name] = time.perf_counter(), []
            for p in prompts:
                outs[name].append(jax.device_get(fn([p])))
            best[name] = min(best[name], (time.perf_counter() - t0) / len(prompts))
    return best, outs


def run_study(cfg, workdir: str | Path, progress: bool = True) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    result = train(cfg, workdir / "sft", progress=progress)
    write_report(workdir / "sft", result.history, None, title="SFT with early exits (LayerSkip loss)")
    tok = CharTokenizer()
    task = get_task(cfg.task.name, **as_dict(cfg.task.kwargs))
    model = build(model_config(cfg.model, tok.vocab_size))
    params, s, T = result.params, cfg.study, int(cfg.eval.max_new_tokens)
    stream = (int(cfg.train.batch_size), int(cfg.seed), int(cfg.train.steps))
    problems, _ = held_out_problems(task, [stream], int(s.held_out), int(cfg.eval.seed))
    prompts = prompt_batch(tok, problems)
    kw = dict(max_new_tokens=T, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
    L = model.cfg.num_layers

    full = jax.device_get(generate(model, params, prompts, **kw))
    rows = [{"measure": "full depth", "threshold": None, "accuracy": _score(task, tok, problems, full),
             "layers_per_token": float(L), "flops_per_token": float(full.stats["flops_per_token"])}]
    for measure, thresholds in dict(s.thresholds).items():
        for thr in thresholds:
            g = jax.device_get(early_exit_generate(model, params, prompts, measure=measure, threshold=float(thr),
                                                   **kw))
            rows.append({"measure": measure, "threshold": float(thr), "accuracy": _score(task, tok, problems, g),
                         "layers_per_token": float(g.stats["layers_per_token"]),
                         "early_exit_fraction": float(g.stats["early_exit_fraction"]),
                         "flops_per_token": float(g.stats["flops_per_token"])})
    base_acc = rows[0]["accuracy"]
    budget = base_acc - float(s.accuracy_points) / 100

    timed = prompts[: int(s.timed_problems)]
    fns, info = {"full-depth greedy": lambda p: generate(model, params, p, **kw)}, {}
    for measure in dict(s.thresholds):
        ok = [r for r in rows if r["measure"] == measure and r["accuracy"] >= budget]
        if ok:  # the fewest layers per token within the accuracy budget
            best = min(ok, key=lambda r: r["layers_per_token"])
            name = f"early exit ({measure} ≥ {best['threshold']:g})"
            fns[name] = lambda p, m=measure, t=best["threshold"]: early_exit_generate(model, params, p, measure=m,
                                                                                      threshold=t, **kw)
            info[name] = {"accuracy": best["accuracy"], "layers_per_token": best["layers_per_token"]}
    for E in s.draft_layers:
        fns[f"self-speculation (exit {int(E)} drafts, γ={int(s.gamma)})"] = lambda p, E=int(E): speculative_generate(
            model, params, p, draft=SelfDraft(E), gamma=int(s.gamma), sampler=Greedy(), **kw)
    seconds, outs = _timed(fns, timed, int(s.repeats))
    t_full, greedy = seconds["full-depth greedy"], outs["full-depth greedy"]
    speed = []
    for name, sec in seconds.items():
        row = {"method": name, "seconds_per_problem": sec, "speedup": t_full / sec, **info.get(name, {})}
        same = all(np.array_equal(a.tokens_BRT, b.tokens_BRT) for a, b in zip(outs[name], greedy, strict=True))
        row["exact"] = name.startswith(("full", "self")) and same
        if name.startswith("self"):
            row["acceptance_rate"] = float(np.mean([o.stats["acceptance_rate"] for o in outs[name]]))
        speed.append(row)
    met = [r["method"] for r in speed[1:] if r["speedup"] >= float(s.speedup)
           and (r["exact"] or r["accuracy"] >= budget)]
    summary = {"workdir": str(workdir), "model": {k: v for k, v in as_dict(cfg.model).items()},
               "task": as_dict(cfg.task), "held_out": len(problems), "timed_problems": len(timed),
               "full_depth_accuracy": base_acc, "thresholds": rows, "wall_clock_batch1": speed,
               "target": {"speedup": float(s.speedup), "accuracy_points": float(s.accuracy_points), "met": bool(met),
                          "methods_meeting": met},
               "minutes": (time.time() - t_start) / 60}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(workdir / "accuracy_vs_layers.png", rows, L)
    write_study_report(workdir / "report.md", summary)
    return summary


def write_study_report(path: Path, s: dict):
    t = s["target"]
    lines = [f"# Early-exit study (`{Path(s['workdir']).name}`)", "",
             f"- task {json.dumps(s['task'])}; model {json.dumps(s['model'], default=str)}",
             f"- held-out: {s['held_out']} problems, greedy; wall clock at batch 1 over {s['timed_problems']} of them "
             "(each alone, after a warm-up; the methods take turns in each pass and the fastest pass counts); this "
             "machine's other load makes the absolute seconds noisy, the ratios are measured side by side; "
             f"{s['minutes']:.1f} min in all", "",
             "| measure | threshold | accuracy | layers / token | early-exit share | FLOPs / token |",
             "|---|---|---|---|---|---|"]
    for r in s["thresholds"]:
        thr = "–" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(f"| {r['measure']} | {thr} | {r['accuracy']:.3f} | {r['layers_per_token']:.2f} | "
                     f"{r.get('early_exit_fraction', 0):.2f} | {r['flops_per_token']:.3g} |")
    lines += ["", "| batch-1 decoding | s / problem | speedup vs full depth | exact | notes |", "|---|---|---|---|---|"]
    for r in s["wall_clock_batch1"]:
        notes = ", ".join(f"{k} {r[k]:.3f}" for k in ("accuracy", "layers_per_token", "acceptance_rate") if k in r)
        lines.append(f"| {r['method']} | {r['seconds_per_problem'] * 1e3:.1f} ms | {r['speedup']:.2f}× | "
                     f"{'yes' if r['exact'] else 'no'} | {notes} |")
    lines += ["", f"**Target** (≥ {t['speedup']:g}× wall clock at batch 1 within {t['accuracy_points']:g} point of "
              f"full-depth accuracy {s['full_depth_accuracy']:.3f}; self-speculation must be exact): "
              + (f"**met** by {', '.join(t['methods_meeting'])}." if t["met"] else "**not met**."), "",
              "![accuracy vs layers](accuracy_vs_layers.png)", ""]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows, L: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, measure in enumerate(dict.fromkeys(r["measure"] for r in rows[1:])):
        pts = sorted((r for r in rows if r["measure"] == measure), key=lambda r: r["layers_per_token"])
        ax.plot([r["layers_per_token"] for r in pts], [r["accuracy"] for r in pts], marker="o", color=f"C{i}",
                label=measure)
    ax.scatter([L], [rows[0]["accuracy"]], marker="*", s=120, color="k", zorder=3, label="full depth")
    ax.set(xlabel="mean layers per generated token", ylabel="held-out accuracy", title="early-exit decoding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    workdir = Path(FLAGS.workdir or Path("runs/early_exit") / time.strftime("%Y%m%d-%H%M%S"))
    s = run_study(FLAGS.config, workdir)
    for r in s["wall_clock_batch1"]:
        print(f"{r['method']:>45}: {r['seconds_per_problem'] * 1e3:7.1f} ms/problem, {r['speedup']:.2f}x")
    print(json.dumps({"workdir": str(workdir), "target_met": s["target"]["met"], "minutes": round(s["minutes"], 2)}))
    print(f"report: {workdir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
