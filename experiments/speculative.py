"""Speculative decoding on arithmetic CoT: acceptance rate α, tokens per target call and wall-clock speedup over
plain `generate` vs the draft length γ, for a small trained draft model and a self-draft (the target's first
layers), against the i.i.d. theory E[tokens per target call] = (1 - α^{γ+1}) / (1 - α).

python -m experiments.speculative [--config=experiments/configs/speculative.py --config.gammas='(2,4)'
    --config.eval.temperature=1.0 --config.eval.batch_size=8]

Writes runs/speculative/<timestamp>/: config.json, summary.json, report.md, alpha.png, tokens_per_call.png,
speedup.png. The target and draft are trained (or restored) under `cfg.model_dir` (see `trained`).
The helpers here (`trained`, `held_out`, `calls_of`, `compare`) also serve `benchmarks.speculative`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks._common import interleaved, median, timed
from lmx.data import CharTokenizer, get_task, held_out_problems, prompt_batch
from lmx.decoding import Greedy, Sampler, SelfDraft, generate, speculative_generate
from lmx.models import build
from lmx.train.loop import model_config, train
from lmx.train.report import quiet_orbax
from lmx.train.sft import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/speculative.py", "Speculative config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/speculative/<timestamp>).")

# speculative_generate's stats summed over calls (the ratios are recomputed from the sums).
COUNT_STATS = ("tokens_generated", "target_calls", "draft_calls", "draft_tokens", "verified_tokens",
               "accepted_tokens", "flops", "draft_flops", "target_flops", "rounds")


# --------------------------------------------------------------------------------------- models and prompts


def trained(train_cfg, model_dir) -> tuple[object, dict, Path]:
    """(model, params, run_dir) of `train_cfg` (a quickstart-style SFT config) trained in
    model_dir/<shape>-<hash of the whole config>. `train` resumes from a run's latest checkpoint, so a run
    that already finished is only restored, and a changed config trains afresh in a new directory."""
    key = hashlib.sha256(train_cfg.to_json(sort_keys=True).encode()).hexdigest()[:12]
    m = train_cfg.model
    run_dir = Path(model_dir) / f"d{m.d_model}-l{m.num_layers}-{key}"
    result = train(train_cfg, run_dir)
    return build(model_config(train_cfg.model, CharTokenizer().vocab_size)), result.params, run_dir


def held_out(cfg, n: int):
    """(task, problems): `n` problems of the target's task whose prompts occur in neither training stream."""
    t, d = cfg.target, cfg.draft
    if t.task.to_json(sort_keys=True) != d.task.to_json(sort_keys=True):
        raise ValueError(f"target and draft must train on one task, got {t.task} and {d.task}")
    task = get_task(t.task.name, **dict(t.task.kwargs))
    streams = [(c.train.batch_size, c.seed, c.train.steps) for c in (t, d)]
    return task, held_out_problems(task, streams, n, int(cfg.eval.seed))[0]


def calls_of(prompts: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """The prompts split into consecutive calls of `batch_size` (the last may be smaller)."""
    return [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]


def sampler_of(temperature: float):
    return Greedy() if temperature == 0 else Sampler(temperature=float(temperature))


def sampler_name(sampler) -> str:
    return "greedy" if sampler.is_greedy else f"temperature {sampler.temperature:g}"


# --------------------------------------------------------------------------------------------- measurement


def theory_tokens_per_call(alpha: float, gamma: float) -> float:
    """E[tokens per target call] for i.i.d. acceptance with rate α and γ drafted tokens (Leviathan et al.)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def first_mismatch(gens_a, gens_b):
    """(call, row, position) of the first differing token (or length) between two lists of Generations."""
    for i, (a, b) in enumerate(zip(gens_a, gens_b, strict=True)):
        ta, tb = np.asarray(a.tokens_BRT[:, 0]), np.asarray(b.tokens_BRT[:, 0])
        la, lb = np.asarray(a.lengths_BR[:, 0]), np.asarray(b.lengths_BR[:, 0])
        for r in range(ta.shape[0]):
            n = max(la[r], lb[r])
            diff = np.flatnonzero(ta[r, :n] != tb[r, :n])
            if diff.size or la[r] != lb[r]:
                return i, r, int(diff[0]) if diff.size else int(min(la[r], lb[r]))
    return None


def compare(target, params, calls, *, sampler, max_new_tokens: int, stop_tokens, rounds: int, spec: dict | None,
            extra_sides: dict[str, Callable[[], object]] | None = None, seed: int = 0,
            min_seconds: float = 0.3) -> dict:
    """Time lmx `generate` and (when `spec` holds speculative_generate's draft/gamma/adaptive) lmx
    `speculative_generate` on the same prompt `calls` (one call per list, run one after another), plus any
    `extra_sides` (e.g. transformers), interleaved round by round after one warm-up call of each side
    (compilation excluded); a side quicker than `min_seconds` repeats within each round. Call i samples with
    key fold_in(key(seed), i) on both lmx sides.

    Returns seconds (median per side over the rounds), rounds_s, the Generations of each lmx side's last
    round, and for speculative, over all calls: alpha (accepted / verified tokens), tokens_per_target_call
    (per live row and round), theory_tokens_per_call at that α and the mean γ drafted per row and round (γ
    unless adaptive), tokens_identical (greedy: vs generate), speedup_vs_generate
    (generated tokens per second; equal to the wall-clock ratio when the tokens are identical), stats sums."""
    greedy = sampler.is_greedy
    keys = [None if greedy else jax.random.fold_in(jax.random.key(seed), i) for i in range(len(calls))]
    out: dict[str, list] = {}

    def side(name, fn):
        def run():
            out[name] = [jax.block_until_ready(fn(c, keys[i])) for i, c in enumerate(calls)]
        return run

    common = dict(max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=tuple(stop_tokens))
    sides = {"generate": side("generate", lambda c, k: generate(target, params, c, rng=k, **common))}
    if spec is not None:
        sides["speculative"] = side("speculative", lambda c, k: speculative_generate(
            target, params, c, rng=k, **spec, **common))
    sides.update(extra_sides or {})
    for fn in sides.values():
        fn()  # warm-up: compiles the lmx programs
    # A side faster than min_seconds runs `reps` times per timed round (then divided), so that a round of
    # tens of milliseconds is not at the mercy of one scheduler hiccup.
    reps = {k: max(1, math.ceil(min_seconds / timed(fn))) for k, fn in sides.items()}
    times = interleaved({k: (lambda fn=fn, n=reps[k]: [fn() for _ in range(n)]) for k, fn in sides.items()}, rounds)
    times = {k: [t / reps[k] for t in v] for k, v in times.items()}
    res = {"seconds": {k: median(v) for k, v in times.items()}, "rounds_s": times, "reps": reps, "outputs": out}
    if spec is None:
        return res

    tokens = {k: sum(int(np.sum(g.lengths_BR)) for g in out[k]) for k in ("generate", "speculative")}
    sums = {k: sum(float(g.stats[k]) for g in out["speculative"]) for k in COUNT_STATS}
    sums["row_rounds"] = sum(int(g.stats["row_rounds"]) for g in out["speculative"])
    alpha = sums["accepted_tokens"] / max(sums["verified_tokens"], 1)  # = stats["acceptance_rate"] for one call
    tpc = 1 + sums["accepted_tokens"] / max(sums["row_rounds"], 1)  # = stats["tokens_per_target_call"] for one
    gamma_mean = sums["draft_tokens"] / max(sums["row_rounds"], 1)
    mismatch = first_mismatch(out["generate"], out["speculative"]) if greedy else None
    theory = theory_tokens_per_call(alpha, gamma_mean)
    tps = {k: tokens[k] / res["seconds"][k] for k in tokens}
    return {**res, "alpha": alpha, "tokens_per_target_call": tpc, "theory_tokens_per_call": theory,
            "tpc_over_theory": tpc / theory, "gamma_mean": gamma_mean,
            "tokens_identical": None if not greedy else mismatch is None, "first_mismatch": mismatch,
            "speedup_vs_generate": tps["speculative"] / tps["generate"], "tokens": tokens,
            "tokens_per_s": tps, "stats": sums}


# ------------------------------------------------------------------------------------------------ the study


def _draft_label(cfg_draft) -> str:
    m = cfg_draft.model
    return f"{m.num_layers}-layer d{m.d_model} model"


def write_plots(run_dir: Path, rows: list[dict]):
    """alpha.png, tokens_per_call.png (measured vs theory at the measured α), speedup.png, all vs γ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafts = list(dict.fromkeys(r["draft"] for r in rows))
    fixed = lambda d: [r for r in rows if r["draft"] == d and not r["adaptive"]]
    adaptive = lambda d: [r for r in rows if r["draft"] == d and r["adaptive"]]
    plots = {"alpha": ("acceptance rate α", "alpha"), "tokens_per_call": ("tokens per target call", None),
             "speedup": ("speedup vs generate (wall clock)", "speedup_vs_generate")}
    for fname, (ylabel, key) in plots.items():
        fig, ax = plt.subplots(figsize=(8.5, 4))
        for i, d in enumerate(drafts):
            color = f"C{i}"
            g = [r["gamma"] for r in fixed(d)]
            if key is None:  # measured points, theory at each γ's measured α, and the curve at the mean α
                ax.plot(g, [r["tokens_per_target_call"] for r in fixed(d)], "o-", color=color, label=f"{d}: measured")
                ax.plot(g, [r["theory_tokens_per_call"] for r in fixed(d)], "x", color=color, ms=8,
                        label=f"{d}: theory at measured α")
                a = float(np.mean([r["alpha"] for r in fixed(d)]))
                gs = np.linspace(min(g), max(g), 50)
                ax.plot(gs, [theory_tokens_per_call(a, x) for x in gs], ":", color=color,
                        label=f"{d}: (1-α^(γ+1))/(1-α), α={a:.2f}")
                ys = [r["tokens_per_target_call"] for r in adaptive(d)]
            else:
                ax.plot(g, [r[key] for r in fixed(d)], "o-", color=color, label=d)
                ys = [r[key] for r in adaptive(d)]
            ax.plot([r["gamma_mean"] for r in adaptive(d)], ys, "*", color=color, ms=12,
                    label=f"{d}: adaptive (at mean γ)")
        if key == "speedup_vs_generate":
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="γ (draft tokens per target call)", ylabel=ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        fig.savefig(run_dir / f"{fname}.png", dpi=120)
        plt.close(fig)


def write_report(run_dir: Path, summary: dict, notes: list[str]):
    head = ["draft", "γ", "α", "tokens / target call", "theory", "measured / theory", "speedup vs generate",
            "draft FLOPs share", "greedy tokens = generate"]
    lines = ["# Speculative decoding on arithmetic CoT", "", *[f"- {n}" for n in notes], "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        g = f"adaptive ≤ {r['gamma']} (mean {r['gamma_mean']:.2f})" if r["adaptive"] else str(r["gamma"])
        same = "-" if r["tokens_identical"] is None else "yes" if r["tokens_identical"] else "**no**"
        lines.append(f"| {r['draft']} | {g} | {r['alpha']:.3f} | {r['tokens_per_target_call']:.3f} | "
                     f"{r['theory_tokens_per_call']:.3f} | {r['tpc_over_theory']:.3f} | "
                     f"{r['speedup_vs_generate']:.2f}× | {r['draft_flops_share']:.3f} | {same} |")
    lines += ["", "![acceptance rate](alpha.png)", "", "![tokens per target call](tokens_per_call.png)", "",
              "![speedup](speedup.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    cfg = _CONFIG.value
    run_dir = Path(_WORKDIR.value or Path("runs/speculative") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json(indent=2, sort_keys=True))
    t0 = time.time()
    target, tparams, tdir = trained(cfg.target, cfg.model_dir)
    draft, dparams, ddir = trained(cfg.draft, cfg.model_dir)
    train_min = (time.time() - t0) / 60

    ev, tok = cfg.eval, CharTokenizer()
    task, problems = held_out(cfg, max(int(ev.num_prompts), int(ev.accuracy_problems)))
    acc_set = problems[: int(ev.accuracy_problems)]
    accuracy = {name: evaluate(m, p, task, tok, acc_set, int(ev.max_new_tokens), len(acc_set))["accuracy"]
                for name, (m, p) in {"target": (target, tparams), "draft": (draft, dparams)}.items()}
    calls = calls_of(prompt_batch(tok, problems[: int(ev.num_prompts)]), int(ev.batch_size))
    sampler = sampler_of(float(ev.temperature))

    E = int(cfg.self_draft_layers) or target.cfg.num_layers // 2
    drafts = {_draft_label(cfg.draft): (draft, dparams), f"self-draft ({E} of {target.cfg.num_layers} layers)":
              SelfDraft(num_layers=E)}
    settings = [(int(g), False) for g in cfg.gammas] + [(int(cfg.adaptive_gamma), True)]
    rows = []
    for dname, d in drafts.items():
        for gamma, adaptive in settings:
            r = compare(target, tparams, calls, sampler=sampler, max_new_tokens=int(ev.max_new_tokens),
                        stop_tokens=(tok.eos_id,), rounds=int(ev.rounds),
                        spec={"draft": d, "gamma": gamma, "adaptive": adaptive}, seed=int(ev.seed))
            if r["tokens_identical"] is False:
                raise AssertionError(f"{dname}, γ={gamma}: greedy speculative tokens differ from generate's at "
                                     f"(call, row, position) {r['first_mismatch']}")
            row = {"draft": dname, "gamma": gamma, "adaptive": adaptive,
                   **{k: r[k] for k in ("alpha", "tokens_per_target_call", "theory_tokens_per_call",
                                        "tpc_over_theory", "gamma_mean", "tokens_identical",
                                        "speedup_vs_generate", "seconds", "tokens", "stats")},
                   "draft_flops_share": r["stats"]["draft_flops"] / max(r["stats"]["flops"], 1)}
            rows.append(row)
            logging.info("%s γ=%d%s: α=%.3f, %.2f tokens/call (theory %.2f), %.2f× generate", dname, gamma,
                         " adaptive" if adaptive else "", row["alpha"], row["tokens_per_target_call"],
                         row["theory_tokens_per_call"], row["speedup_vs_generate"])
    minutes = (time.time() - t0) / 60
    summary = {"accuracy": accuracy, "target_dir": str(tdir), "draft_dir": str(ddir), "sampler": sampler_name(sampler),
               "batch_size": int(ev.batch_size), "num_prompts": int(ev.num_prompts), "rows": rows,
               "backend": jax.default_backend(), "train_minutes": train_min, "minutes": minutes}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tc = target.cfg
    notes = [
        f"target: {tc.num_layers} layers, d_model {tc.d_model} ({tdir}), held-out greedy accuracy "
        f"{accuracy['target']:.3f} on {len(acc_set)} problems; draft: {_draft_label(cfg.draft)} ({ddir}), "
        f"accuracy {accuracy['draft']:.3f}",
        f"{int(ev.num_prompts)} held-out prompts in calls of {int(ev.batch_size)}, {sampler_name(sampler)}, "
        f"max_new_tokens {int(ev.max_new_tokens)}, stop at eos; {jax.default_backend()}; speedup: generated "
        f"tokens/s of speculative_generate over generate, median of {int(ev.rounds)} interleaved rounds after a "
        "warm-up call",
        "α = accepted / verified tokens (those the target tested: up to and including the first rejection); "
        "tokens / target call: per live row and round; theory = (1 - α^(γ+1)) / (1 - α) at the measured α "
        "(i.i.d. acceptance); adaptive rows use the mean γ drafted per row and round",
        f"wall time: {train_min:.1f} min training (or restoring), {minutes:.1f} min in all",
    ]
    write_plots(run_dir, rows)
    write_report(run_dir, summary, notes)
    print(json.dumps({"run_dir": str(run_dir), "minutes": round(minutes, 2), "accuracy": accuracy}))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
