"""Test-time scaling study (issue 11 item 6): accuracy vs generated tokens vs eFLOPs for every decoding method.

python -m experiments.tts [--config=experiments/configs/tts.py] [--workdir=runs/tts/<t>]
    [--config.init_from=<an SFT run dir>] [--config.eval.num_problems=64] [--config.eval.skip=particle_filter]

Trains a short SFT run (or reuses `init_from`) so the model is imperfect, then evaluates one fixed held-out set
with each method at k ∈ cfg.eval.ks (methods without k: one point). All problems go in one batched call per
(method, k). Writes <workdir>/: config.json, sft/, summary.json (a list of {method, k, accuracy, gen_tokens,
eflops}), report.md, accuracy_vs_tokens.png, accuracy_vs_eflops.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lmx.data import prompt_batch
from lmx.data.tasks.process import prefix_scorer
from lmx.decoding import cost
from lmx.decoding.budget import BudgetForcing, no_thinking_prompts
from lmx.decoding.generate import generate
from lmx.decoding.latent import SoftThinking, latent_generate
from lmx.decoding.sampling import Greedy, Sampler
from lmx.decoding.scaling import best_of_n, majority_vote, run_method
from lmx.decoding.search import astar_search, beam_search, particle_filter
from lmx.train.checkpoint import Checkpointer
from lmx.train.loop import cached_optimizer, optim_config, run_setup, train, write_config
from lmx.train.report import quiet_orbax, write_report
from lmx.train.rl_train import sft_config
from lmx.train.state import abstract_state

FLAGS = flags.FLAGS


def define_flags():
    """--config and --workdir, defined only when run as a script: the tests import several studies in one process,
    and absl refuses a flag defined twice."""
    config_flags.DEFINE_config_file("config", "experiments/configs/tts.py", "Study config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory (default runs/tts/<timestamp>).")


# (method, uses k): scaling.run_method's names, then the search / budget / latent methods.
METHODS = (("greedy", False), ("majority", True), ("weighted_majority", True), ("best_of_n", True), ("bom", True),
           ("rpc", True), ("ffs", True), ("short_m_at_k", True), ("beam_search", True), ("particle_filter", True),
           ("astar", True),
           ("budget_forcing", False), ("no_thinking", False), ("soft_thinking", False))


def load_sft(cfg, workdir: Path, progress: bool):
    """(sft config, params, sft dir, minutes trained here or None) from cfg.init_from or a fresh short SFT run."""
    if cfg.init_from:
        sft_dir = Path(cfg.init_from)
        if not (sft_dir / "config.json").exists():
            raise FileNotFoundError(f"config.init_from={cfg.init_from!r} is not an SFT run directory (no config.json)")
        sft_cfg = ConfigDict(json.loads((sft_dir / "config.json").read_text()))
        _, _, _, model, _, _ = run_setup(sft_cfg)
        with Checkpointer(sft_dir / "checkpoints", every=1, keep=1) as ckpt:
            restored = ckpt.restore_latest(abstract_state(model, cached_optimizer(optim_config(sft_cfg))))
        if restored is None:
            raise FileNotFoundError(f"no complete checkpoint under {sft_dir / 'checkpoints'}")
        return sft_cfg, restored[0].params, sft_dir, None
    sft_dir, sft_cfg = workdir / "sft", sft_config(cfg)
    t0 = time.time()
    result = train(sft_cfg, sft_dir, progress=progress)
    minutes = (time.time() - t0) / 60
    write_report(sft_dir, result.history, None, title="SFT", notes=[f"wall time: {minutes:.1f} min"])
    return sft_cfg, result.params, sft_dir, minutes


def _point(method, k, res_or_gen, scores_B, B, hardware, extra=None) -> dict:
    """One summary row: accuracy, and tokens / eFLOPs per problem over everything the method generated."""
    stats = {key: np.asarray(v).item() for key, v in res_or_gen.stats.items()}
    return {"method": method, "k": k, "accuracy": float(np.mean(scores_B)),
            "gen_tokens": stats["tokens_generated"] / B, "eflops": cost.eflops(stats, hardware) / B, **(extra or {})}


def _scored(task, problems, res) -> np.ndarray:
    """task.score of each chosen completion (0 where none was chosen), as run_method scores."""
    return np.array([float(task.score(p, res.completions_BR[b][c])) if c >= 0 else 0.0
                     for b, (p, c) in enumerate(zip(problems, res.chosen_B.tolist(), strict=True))])


def short_m(spec, k: int) -> int:
    return math.ceil(k / 2) if spec == "half" else min(int(spec), k)


def evaluate_methods(cfg, model, params, tok, task, problems, log=logging.info) -> list[dict]:
    """Every (method, k) point on `problems`; each one batched call (the particle filter: one call, host-side steps)."""
    ev, B = cfg.eval, len(problems)
    prompts = prompt_batch(tok, problems)
    sampler, T = Sampler(temperature=float(ev.temperature)), int(ev.max_new_tokens)
    skip = {s.strip() for s in str(ev.skip).split(",") if s.strip()}
    max_k = {name: int(v) for name, v in dict(ev.get("max_k", {})).items()}
    hw, eos = str(cfg.hardware), (tok.eos_id,)
    rows = []
    common = dict(tok=tok, task=task, problems=problems, sampler=sampler, max_new_tokens=T)

    def add(row, t0):
        row["seconds"] = time.time() - t0
        rows.append(row)
        log(f"{row['method']:>18} k={row['k']!s:>4}: accuracy {row['accuracy']:.3f}, {row['gen_tokens']:.1f} "
            f"tokens, {row['eflops']:.3g} eFLOPs / problem ({row['seconds']:.1f} s)")

    for method, uses_k in METHODS:
        if method in skip:
            continue
        ks = [k for k in ev.ks if k <= max_k.get(method, max(ev.ks))] if uses_k else [None]
        for k in ks:
            t0, rng = time.time(), jax.random.key(int(cfg.seed) + (k or 0))  # same samples for every vote at k
            if method in ("greedy", "majority", "weighted_majority", "best_of_n", "bom", "rpc", "ffs",
                          "short_m_at_k"):
                m = short_m(ev.short_m, k) if method == "short_m_at_k" else None
                res = run_method(method, model, params, prompts, k=k or 1, m=m, rng=rng, **common,
                                 scorer="verifier" if method == "best_of_n" else None,
                                 alpha=float(ev.bom_alpha) if method == "bom" else None)
                # Spread of sample lengths within a problem: what early stopping (FFS, short-m@k) can save.
                spread = float(np.mean(np.ptp(res.lengths_BR, axis=-1)))
                add(_point(method, k, res, res.task_scores_B, B, hw, {"m": m, "length_spread": spread}), t0)
            elif method == "beam_search":  # the best hypothesis (beams come back best first)
                gen = beam_search(model, params, prompts, beam=k, max_new_tokens=T, stop_tokens=eos,
                                  pad_id=tok.pad_id)
                res = best_of_n(gen, tok, task, scorer=np.asarray(gen.scores_BR))
                add(_point(method, k, gen, _scored(task, problems, res), B, hw), t0)
            elif method == "particle_filter":  # steps end at ';'; the answer: the final particle of highest reward
                gen = particle_filter(model, params, prompts, num_particles=k, step_token=tok.encode(";")[0],
                                      scorer=prefix_scorer(task, problems, tokenizer=tok), max_new_tokens=T,
                                      rng=rng, sampler=sampler, stop_tokens=eos, pad_id=tok.pad_id)
                res = best_of_n(gen, tok, task, scorer=np.asarray(gen.rewards_BR))
                add(_point(method, k, gen, _scored(task, problems, res), B, hw), t0)
            elif method == "astar":  # frontier k, 2 children per expansion, at most k·T/2 tokens a problem
                gen = astar_search(model, params, prompts, expand=2, frontier=k, step_token=tok.encode(";")[0],
                                   scorer=prefix_scorer(task, problems, tokenizer=tok), token_budget=k * T // 2,
                                   max_new_tokens=T, rng=rng, sampler=sampler, stop_tokens=eos, pad_id=tok.pad_id)
                res = majority_vote(gen, tok, task)  # R = 1: the path the search returned
                add(_point(method, k, gen, _scored(task, problems, res), B, hw), t0)
            elif method == "budget_forcing":  # greedy, thinking capped at each budget; one point per budget
                for budget in ev.budgets:
                    t0 = time.time()
                    gen = generate(model, params, prompts, max_new_tokens=T, sampler=Greedy(), stop_tokens=eos,
                                   pad_id=tok.pad_id, forcing=BudgetForcing.from_tokenizer(tok, int(budget)))
                    res = majority_vote(gen, tok, task)
                    add(_point(f"budget_forcing@{int(budget)}", None, gen, _scored(task, problems, res), B, hw,
                               {"budget": int(budget)}), t0)
            elif method == "no_thinking":  # greedy after a prefilled empty thinking block
                gen = generate(model, params, no_thinking_prompts(prompts, tok), max_new_tokens=T, sampler=Greedy(),
                               stop_tokens=eos, pad_id=tok.pad_id)
                res = majority_vote(gen, tok, task)
                add(_point(method, k, gen, _scored(task, problems, res), B, hw), t0)
            else:  # soft thinking, greedy outside the thinking block
                gen = latent_generate(model, params, prompts, max_new_tokens=T, stop_tokens=eos, pad_id=tok.pad_id,
                                      mode=SoftThinking(temperature=float(ev.soft_temperature)))
                res = majority_vote(gen, tok, task)
                add(_point(method, k, gen, _scored(task, problems, res), B, hw), t0)
    return rows


def _at(rows, method, k=None):
    return next((r for r in rows if r["method"] == method and r["k"] == k), None)


def what_we_see(rows: list[dict]) -> list[str]:
    """Comparisons computed from the numbers (none is asserted in advance)."""
    out = []
    pairs = [(_at(rows, "short_m_at_k", r["k"]), r) for r in rows if r["method"] == "majority"]
    pairs = [(s, m) for s, m in pairs if s is not None]
    if pairs:
        out.append("short-m@k (m = ceil(k/2)) vs majority@k at equal k: " + "; ".join(
            f"k={m['k']}: accuracy {s['accuracy']:.3f} vs {m['accuracy']:.3f}, tokens {s['gen_tokens']:.1f} vs "
            f"{m['gen_tokens']:.1f} ({100 * (s['gen_tokens'] / m['gen_tokens'] - 1):+.0f}%)" for s, m in pairs) + ".")
    spread = max((r for r in rows if r["method"] == "majority"), key=lambda r: r["k"], default=None)
    if spread is not None:
        out.append(f"At k={spread['k']} a problem's samples differ in length by {spread['length_spread']:.1f} tokens "
                   "on average (max − min): what FFS and short-m@k can stop early on" + (
                       "; that is almost nothing, so they choose among near-equal lengths, i.e. by sample index."
                       if spread["length_spread"] < 2 else "."))
    pairs = [(_at(rows, "ffs", r["k"]), r) for r in rows if r["method"] == "majority"]
    pairs = [(f, m) for f, m in pairs if f is not None]
    if pairs:
        out.append("FFS vs majority@k: " + "; ".join(
            f"k={m['k']}: accuracy {f['accuracy']:.3f} vs {m['accuracy']:.3f}, tokens {f['gen_tokens']:.1f} vs "
            f"{m['gen_tokens']:.1f}" for f, m in pairs) + ".")
    pf, bon = [r for r in rows if r["method"] == "particle_filter"], [r for r in rows if r["method"] == "best_of_n"]
    if pf and bon:  # the best-of-N point whose token budget is nearest (in log) to each particle-filter point
        near = [(p, min(bon, key=lambda b, p=p: abs(math.log(b["gen_tokens"] / p["gen_tokens"])))) for p in pf]
        out.append("Particle filtering (process verifier) vs best-of-N (outcome verifier, oracle) at the nearest "
                   "token budget: " + "; ".join(
                       f"PF k={p['k']} {p['accuracy']:.3f} at {p['gen_tokens']:.0f} tokens vs BoN k={b['k']} "
                       f"{b['accuracy']:.3f} at {b['gen_tokens']:.0f}" for p, b in near) + ".")
    astar = [r for r in rows if r["method"] == "astar"]
    if astar and pf:
        out.append("A* step search vs particle filtering (both with the process verifier) at equal k: " + "; ".join(
            f"k={a['k']}: {a['accuracy']:.3f} at {a['gen_tokens']:.0f} tokens vs {p['accuracy']:.3f} at "
            f"{p['gen_tokens']:.0f}" for a in astar for p in pf if p["k"] == a["k"]) + ".")
    g = _at(rows, "greedy")
    votes = [r for r in rows if r["method"] in ("majority", "weighted_majority", "bom", "rpc") and r["k"]]
    if g and votes:
        top = max(votes, key=lambda r: r["accuracy"])
        one = _at(rows, "majority", 1)
        out.append((f"One τ-sample is right {one['accuracy']:.3f} of the time vs greedy {g['accuracy']:.3f}; " if one
                    else "") + f"the best vote without a verifier is {top['method']}@{top['k']} at "
                   f"{top['accuracy']:.3f} ({'above' if top['accuracy'] > g['accuracy'] else 'not above'} greedy).")
    forced = [r for r in rows if r["method"].startswith("budget_forcing@") or r["method"] in ("no_thinking",
                                                                                             "soft_thinking")]
    if g and forced:
        out.append("Greedy with less or other thinking: " + ", ".join(
            f"{r['method']} {r['accuracy']:.3f} at {r['gen_tokens']:.1f} tokens" for r in forced)
                   + f" (greedy {g['accuracy']:.3f} at {g['gen_tokens']:.1f}).")
    if g:
        best = max(rows, key=lambda r: (r["accuracy"], -r["gen_tokens"]))
        out.append(f"Greedy: {g['accuracy']:.3f} at {g['gen_tokens']:.1f} tokens; the most accurate point is "
                   f"{best['method']}" + (f"@{best['k']}" if best["k"] else "") +
                   f" ({best['accuracy']:.3f} at {best['gen_tokens']:.1f} tokens, "
                   f"{best['eflops'] / g['eflops']:.1f}× greedy's eFLOPs).")
    return out


def write_study_report(path: Path, rows, meta: dict):
    lines = [f"# Test-time scaling study (`{path.parent.name}`)", "",
             f"- task: {meta['task']}; model {meta['model']}",
             f"- SFT: {meta['sft_steps']} steps (`{meta['sft_dir']}`, " +
             (f"trained here, {meta['sft_minutes']:.1f} min)" if meta["sft_minutes"] is not None else "reused)"),
             f"- held-out: {meta['problems']} problems; sampling τ = {meta['temperature']:g}, "
             f"≤ {meta['max_new_tokens']} new tokens; k ∈ {meta['ks']}; eFLOPs at {meta['hardware']}, per problem",
             "- best-of-N scores with the task's exact verifier (an oracle bound); BoM: α = "
             f"{meta['bom_alpha']:g}, mean-log-prob scorer; weighted majority: mean token prob; short-m@k: m = "
             f"{'ceil(k/2)' if meta['short_m'] == 'half' else meta['short_m']}; beam search: beam = k, best beam; "
             "particle filter: particles = k, exact process verifier (`prefix_scorer`), steps end at ';', answer = "
             "the final particle of highest reward; A*: frontier k, 2 children per expansion, token budget k·T/2, same "
             "verifier and steps; budget forcing / NoThinking / soft thinking: greedy",
             "- tokens count everything a method generated (all k samples, pruned beams, dropped particles)",
             f"- wall time {meta['wall_minutes']:.1f} min (evaluation {meta['eval_minutes']:.1f} min)", "",
             "| method | k | accuracy | generated tokens / problem | eFLOPs / problem | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['k'] if r['k'] else '–'} | {r['accuracy']:.3f} | {r['gen_tokens']:.1f} | "
              f"{r['eflops']:.3g} | {r['seconds']:.1f} |" for r in rows]
    lines += ["", "## What we see", "", *[f"- {s}" for s in what_we_see(rows)], "", *meta.get("notes", []),
              "![accuracy vs tokens](accuracy_vs_tokens.png)", "", "![accuracy vs eFLOPs](accuracy_vs_eflops.png)", ""]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows, key: str, xlabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    single = [r for r in rows if r["k"] is None]
    for i, name in enumerate(dict.fromkeys(r["method"] for r in rows if r["k"] is not None)):
        pts = [r for r in rows if r["method"] == name]
        ax.plot([r[key] for r in pts], [r["accuracy"] for r in pts], marker="o", ms=4, color=f"C{i % 10}",
                ls="-" if i < 10 else "--", label=name)
    for j, r in enumerate(single):  # methods without k: one marker each
        ax.scatter(r[key], r["accuracy"], marker="*^sDvP"[j % 6], s=70, color="k" if j < 6 else "gray",
                   zorder=3, label=r["method"])
    ax.set(xscale="log", xlabel=xlabel, ylabel="held-out accuracy", title=f"accuracy vs {xlabel}", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(cfg, workdir: str | Path, progress: bool = True) -> list[dict]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, workdir, 0)
    t_start = time.time()
    sft_cfg, params, sft_dir, sft_minutes = load_sft(cfg, workdir, progress)
    tok, task, _, model, _, _ = run_setup(sft_cfg)
    # Held out from SFT: a stream apart from the training batches (those use [seed, step]), as train's eval set.
    problems = task.sample(np.random.default_rng([int(cfg.eval.seed), 1 << 20]), int(cfg.eval.num_problems))
    t_eval = time.time()
    rows = evaluate_methods(cfg, model, params, tok, task, problems)
    ev = cfg.eval
    meta = {"task": f"{sft_cfg.task.name} {json.dumps(dict(sft_cfg.task.get('kwargs', {})))}",
            "model": json.dumps(dict(sft_cfg.model)), "sft_steps": int(sft_cfg.train.steps), "sft_dir": str(sft_dir),
            "sft_minutes": sft_minutes, "problems": len(problems), "temperature": float(ev.temperature),
            "max_new_tokens": int(ev.max_new_tokens), "ks": list(ev.ks), "hardware": str(cfg.hardware),
            "bom_alpha": float(ev.bom_alpha), "short_m": ev.short_m, "eval_minutes": (time.time() - t_eval) / 60,
            "wall_minutes": (time.time() - t_start) / 60}
    if ev.skip or ev.get("max_k"):
        meta["notes"] = [f"Cut for time: skipped `{ev.skip}`; k capped per method {dict(ev.max_k)}.", ""]
    (workdir / "summary.json").write_text(json.dumps(
        [{k: r[k] for k in ("method", "k", "accuracy", "gen_tokens", "eflops")} for r in rows], indent=2))
    plot(workdir / "accuracy_vs_tokens.png", rows, "gen_tokens", "generated tokens per problem")
    plot(workdir / "accuracy_vs_eflops.png", rows, "eflops", "eFLOPs per problem")
    write_study_report(workdir / "report.md", rows, meta)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    logging.set_verbosity(logging.INFO)
    workdir = Path(FLAGS.workdir or Path("runs/tts") / time.strftime("%Y%m%d-%H%M%S"))
    rows = run_study(FLAGS.config, workdir)
    for r in rows:
        print(f"{r['method']:>18} k={r['k']!s:>4}: acc {r['accuracy']:.3f}  tokens {r['gen_tokens']:8.1f}  "
              f"eFLOPs {r['eflops']:.3g}")
    print(f"report: {workdir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
