"""ParScale study (issue 12 item 4): does running P parallel streams through the same weights buy the loss of a
larger model, and at what decoding cost?

python -m experiments.parscale [--config=experiments/configs/parscale.py] [--workdir=runs/parscale/<t>]
    [--config.sizes='(32,64)'] [--config.streams='(1,2)'] [--config.train.steps=400]

For every base size (d_model) in cfg.sizes and every P in cfg.streams, trains a model from scratch with
`lmx.train.loop.train` on the same batches (same seed, steps and tokens: equal base parameters, P× the training
FLOPs), then measures on held-out problems unseen in training: teacher-forced cross-entropy on the target tokens
and greedy exact-answer accuracy. The P = 1 runs of the smallest size are retrained with cfg.noise.seeds to show the
seed-to-seed spread. Fits L(N, P) = E + (A / (N (k ln P + 1)))^α (ALGORITHMS.md §5; N = base parameters) by least
squares over a (k, α) grid, E and A^α linear. Measures decode tokens/s of `generate` at a few batch sizes
(fixed-length greedy decoding, after a warm-up call) and the memory it holds (weights + KV cache), and sets each
ParScale run beside parameter scaling: the measured larger P = 1 model that matches its loss, and a P = 1 model of
the same loss gain interpolated between the measured sizes.

Writes <workdir>/: config.json, one run directory per (size, P) (d<D>_P<P>/; the seed-noise runs d<D>_P<P>_seed<s>/),
summary.json, report.md, loss_vs_P.png, throughput.png and training.png. Re-running with the same --workdir resumes
finished runs from their checkpoints (their measurements are redone).

Training goes through lmx.train.loop.train as it is: ParScale takes the loop's packed segment ids (each segment sees
its streams' prefixes and its own tokens).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lmx.data import CharTokenizer, encode_example, get_task, held_out_problems, make_batch, prompt_batch
from lmx.decoding import Greedy, generate
from lmx.decoding.cost import forward_flops, param_count
from lmx.models import build
from lmx.train.loop import as_dict, model_config, train, write_config
from lmx.train.report import pyplot, quiet_orbax, sample_rows
from lmx.train.sft import masked_cross_entropy

FLAGS = flags.FLAGS


def define_flags():
    """--config and --workdir, defined only when run as a script: the tests import several studies in one process,
    and absl refuses a flag defined twice."""
    config_flags.DEFINE_config_file("config", "experiments/configs/parscale.py", "Study config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory (default runs/parscale/<timestamp>).")


# ------------------------------------------------------------------------------------------------ runs


def run_name(d_model: int, P: int) -> str:
    return f"d{d_model}_P{P}"


def run_config(cfg, d_model: int, P: int) -> ConfigDict:
    """The `lmx.train.loop.train` config of one (size, P) run: cfg's shared sections, this size's widths."""
    head_dim = int(cfg.model.head_dim)
    if d_model % head_dim:
        raise ValueError(f"config.sizes has d_model={d_model}, not a multiple of config.model.head_dim={head_dim}")
    model = {**as_dict(cfg.model), "d_model": int(d_model), "num_heads": d_model // head_dim,
             "num_kv_heads": d_model // head_dim, "mlp_dim": int(cfg.mlp_ratio) * int(d_model)}
    if P > 1:
        model["parscale"] = {"P": int(P), **as_dict(cfg.parscale)}
    return ConfigDict({"seed": int(cfg.seed), "task": as_dict(cfg.task), "model": model, "train": as_dict(cfg.train),
                       "optim": as_dict(cfg.optim), "eval": as_dict(cfg.eval), "mesh": as_dict(cfg.mesh)})


def held_out_batches(tok, problems, batch_size: int, seq_len: int) -> list[dict]:
    """Right-padded teacher-forcing batches of the problems, all of one shape (the last filled with masked rows)."""
    examples = [encode_example(tok, p) for p in problems]
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        chunk += [(chunk[-1][0], np.zeros_like(chunk[-1][1]))] * (batch_size - len(chunk))  # no loss on fillers
        batch = make_batch(chunk, seq_len, tok.pad_id)
        out.append({"tokens_BT": batch["tokens_BT"], "loss_mask_BT": batch["loss_mask_BT"]})
    return out


@functools.lru_cache(maxsize=16)
def _loss_fn(model_cfg):
    """The jitted teacher-forced loss of build(model_cfg), one per config (the seed-noise runs share it)."""
    model = build(model_cfg)
    return jax.jit(lambda p, t, m: masked_cross_entropy(model.apply({"params": p}, t).logits_BTV, t, m))


def held_out_loss(model_cfg, params, batches: list[dict]) -> dict[str, float]:
    """Teacher-forced cross-entropy (nats per target token) and next-token accuracy over all target tokens of the
    batches (a token-weighted mean over batches: padding never enters it)."""
    fn = _loss_fn(model_cfg)
    total = correct = tokens = 0.0
    for b in batches:
        loss, metrics = jax.device_get(fn(params, b["tokens_BT"], b["loss_mask_BT"]))
        n = float(metrics["tokens"])
        total, correct, tokens = total + float(loss) * n, correct + float(metrics["token_accuracy"]) * n, tokens + n
    return {"held_out_loss": total / tokens, "held_out_token_accuracy": correct / tokens, "held_out_tokens": tokens}


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _decode(model, params, prompts, new_tokens: int):
    """Greedy decoding of `new_tokens` tokens for every prompt with no stop token (every row decodes them all)."""
    return jax.block_until_ready(generate(model, params, prompts, max_new_tokens=new_tokens, sampler=Greedy()))


def greedy_accuracy(model, params, task, tok, problems, new_tokens: int, batch_size: int) -> dict:
    """Greedy exact-answer accuracy (as `lmx.train.sft.evaluate` scores it) from fixed-length decoding, the program
    `decode_throughput` times at this batch size (one compilation for both): a completion is its tokens before the
    first eos, which greedy decoding makes the same as stopping there. gen_tokens counts the eos."""
    samples = []
    for i in range(0, len(problems), batch_size):
        chunk = list(problems[i:i + batch_size])
        prompts = prompt_batch(tok, chunk)
        prompts += [prompts[-1]] * (batch_size - len(chunk))  # one batch shape: one compiled program
        tokens_BT = np.asarray(_decode(model, params, prompts, new_tokens).tokens_BRT[:, 0])
        for problem, row in zip(chunk, tokens_BT.tolist(), strict=False):
            n = row.index(tok.eos_id) if tok.eos_id in row else len(row)
            text = tok.decode(row[:n])
            samples.append({"prompt": problem.prompt, "completion": text, "answer": problem.answer,
                            "score": float(task.score(problem, text)), "gen_tokens": min(n + 1, len(row))})
    return {"accuracy": float(np.mean([s["score"] for s in samples])),
            "gen_tokens": float(np.mean([s["gen_tokens"] for s in samples])), "samples": samples}


def decode_throughput(model, params, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s of fixed-length greedy decoding (`_decode`) of the prompts: one warm-up call (compilation), then the
    best of `repeats` timed calls (the machine may be shared). kv_bytes: the KV cache the call allocates."""
    gen = _decode(model, params, prompts, new_tokens)
    times = []
    for _ in range(max(int(repeats), 1)):
        t0 = time.perf_counter()
        _decode(model, params, prompts, new_tokens)
        times.append(time.perf_counter() - t0)
    best, B = min(times), len(prompts)
    return {"batch": B, "new_tokens": int(new_tokens), "seconds": best, "median_seconds": float(np.median(times)),
            "tokens_per_s": B * new_tokens / best, "ms_per_step": 1e3 * best / new_tokens,
            "kv_bytes": int(gen.stats["kv_bytes"]), "flops_per_token": float(gen.stats["flops_per_token"])}


def _run_one(cfg, d_model, P, workdir, tok, task, loss_batches, greedy_problems, prompts, progress) -> tuple:
    name = run_name(d_model, P)
    run_cfg = run_config(cfg, d_model, P)
    t0 = time.time()
    result = train(run_cfg, workdir / name, progress=progress)
    train_minutes = (time.time() - t0) / 60
    model_cfg = model_config(run_cfg.model, tok.vocab_size)
    model = build(model_cfg)
    t1 = time.time()
    row = {"name": name, "d_model": int(d_model), "P": int(P), "params": param_count(model_cfg),
           "parscale_params": tree_bytes(result.params.get("parscale", {})) // np.dtype(model_cfg.param_dtype).itemsize,
           "weight_bytes": tree_bytes(result.params),
           "train_flops_per_token": float(forward_flops(model_cfg, 0, int(cfg.train.seq_len))) / int(cfg.train.seq_len),
           **held_out_loss(model_cfg, result.params, loss_batches)}
    new_tokens, batch_sizes = int(cfg.eval.max_new_tokens), [int(b) for b in cfg.throughput.batch_sizes]
    ev = greedy_accuracy(model, result.params, task, tok, greedy_problems, new_tokens, max(batch_sizes))
    row.update({"accuracy": ev["accuracy"], "gen_tokens": ev["gen_tokens"]})
    train_rows = [h for h in result.history if "loss" in h]
    row["train_loss_final"] = float(np.mean([h["loss"] for h in train_rows[-3:]]))
    row["throughput"] = {str(B): decode_throughput(model, result.params, prompts[:B], new_tokens,
                                                   int(cfg.throughput.repeats)) for B in batch_sizes}
    for tp in row["throughput"].values():
        tp["memory_bytes"] = row["weight_bytes"] + tp["kv_bytes"]
    row.update({"train_minutes": train_minutes, "measure_minutes": (time.time() - t1) / 60,
                "run_dir": str(workdir / name)})
    logging.info("%s: held-out loss %.4f, accuracy %.3f, %.1f min", name, row["held_out_loss"], row["accuracy"],
                 train_minutes)
    return row, result.history, ev["samples"][:2]


# ------------------------------------------------------------------------------------------------ the fit


def _linear_fit(X_Gn, y_n):
    """For each row g of X: min over E, c >= 0 of Σ_n (E + c X_gn − y_n)²; returns (E_G, c_G, sse_G)."""
    n = y_n.shape[0]
    mx, my = X_Gn.mean(1), y_n.mean()
    dx = X_Gn - mx[:, None]
    var = (dx * dx).sum(1)
    c = np.where(var > 0, (dx * (y_n - my)).sum(1) / np.where(var > 0, var, 1), 0.0)
    E = my - c * mx
    neg_c = c < 0  # a loss rising with N·(k ln P + 1): no c > 0 fits, the best is the constant
    c, E = np.where(neg_c, 0.0, c), np.where(neg_c, my, E)
    neg_E = E < 0  # the loss floor cannot be negative: refit c through the origin
    c0 = np.maximum((X_Gn * y_n).sum(1) / np.maximum((X_Gn * X_Gn).sum(1), 1e-300), 0.0)
    c, E = np.where(neg_E, c0, c), np.where(neg_E, 0.0, E)
    sse = ((E[:, None] + c[:, None] * X_Gn - y_n) ** 2).sum(1)
    del n
    return E, c, sse


def fit_scaling_law(N, P, L, *, alpha_min=0.01, alpha_max=3.0, k_min=-0.7, k_max=5.0, grid=121, zoom=3) -> dict:
    """Least-squares fit of L = E + (A / (N (k ln P + 1)))^α to the runs' (N, P, L).

    For fixed (k, α) the model is linear in E and c = A^α (x = (N (k ln P + 1))^−α), solved in closed form with
    E >= 0, c >= 0; (k, α) come from a grid (α log-spaced) zoomed `zoom` times around its best point. k is kept
    where k ln P + 1 > 0 for every P. Returns E, A (and log10 A), k, α, the per-run predictions and residuals,
    rmse, R², and whether k or α ended at the edge of the initial grid (the fit did not pin it down)."""
    N, P, L = (np.asarray(x, np.float64) for x in (N, P, L))
    lnP = np.log(P)
    if lnP.max() > 0:
        k_min = max(k_min, -1 / lnP.max() + 1e-3)
    ks = np.linspace(k_min, k_max, grid)
    log_alphas = np.linspace(np.log(alpha_min), np.log(alpha_max), grid)
    best = None
    for level in range(zoom + 1):
        for k in ks:
            neff = N * (k * lnP + 1)
            X = np.exp(-np.exp(log_alphas)[:, None] * np.log(neff)[None, :])
            E, c, sse = _linear_fit(X, L)
            i = int(np.argmin(sse))
            if best is None or sse[i] < best[0]:
                best = (float(sse[i]), float(k), float(np.exp(log_alphas[i])), float(E[i]), float(c[i]))
        if level < zoom:  # a finer grid around the best point, 2 initial steps wide
            dk = 2 * (ks[1] - ks[0]) if len(ks) > 1 else 0.0
            da = 2 * (log_alphas[1] - log_alphas[0]) if len(log_alphas) > 1 else 0.0
            ks = np.linspace(max(best[1] - dk, k_min), min(best[1] + dk, k_max), 21)
            log_alphas = np.linspace(np.log(best[2]) - da, np.log(best[2]) + da, 21)
    sse, k, alpha, E, c = best
    pred = E + c * (N * (k * lnP + 1)) ** -alpha
    resid = L - pred
    sst = float(((L - L.mean()) ** 2).sum())
    edge = lambda v, lo, hi: bool(np.isclose(v, lo, rtol=1e-3) or np.isclose(v, hi, rtol=1e-3))
    log10_A = float(np.log10(c) / alpha) if c > 0 else None
    return {"E": E, "A": 10 ** log10_A if log10_A is not None and log10_A < 300 else None, "log10_A": log10_A,
            "k": k, "alpha": alpha, "c": c, "predicted": pred.tolist(), "residuals": resid.tolist(),
            "rmse": float(np.sqrt(np.mean(resid**2))), "max_abs_residual": float(np.abs(resid).max()),
            "r2": 1 - sse / sst if sst > 0 else None, "points": int(len(L)),
            "E_at_bound": bool(E == 0),
            "k_at_grid_edge": edge(k, k_min, k_max), "alpha_at_grid_edge": edge(alpha, alpha_min, alpha_max),
            "param_multiplier": {str(int(p)): float(k * math.log(p) + 1) for p in sorted(set(P.tolist()))}}


def equivalent_params(N_base, L_base, L) -> tuple[float | None, str]:
    """The base parameters a P = 1 model would need for loss L, interpolating log N linearly in loss between the
    measured P = 1 sizes (fit-free). ("lower", None) when L is below every P = 1 loss (more than the largest size:
    unknown), ("higher", None) when above them all, ("non-monotone", None) when the P = 1 losses do not fall with N."""
    order = np.argsort(N_base)
    n, lb = np.log(np.asarray(N_base, float)[order]), np.asarray(L_base, float)[order]
    if len(lb) < 2 or np.any(np.diff(lb) >= 0):
        return None, "non-monotone"
    if L < lb[-1]:
        return None, "lower"
    if L > lb[0]:
        return None, "higher"
    return float(np.exp(np.interp(L, lb[::-1], n[::-1]))), "interpolated"


# ------------------------------------------------------------------------------------------------ comparisons


def comparisons(rows: list[dict], batch_sizes) -> list[dict]:
    """Each ParScale run beside parameter scaling, as increases over its own P = 1 model of memory (weights + KV
    cache) and decode time per step at each batch size, against two references:
      matched: the measured P = 1 model of a larger size, the smallest whose loss is at most the ParScale run's, else
        the one of the closest loss (its gain may be far from ParScale's);
      equal_gain: a P = 1 model of the fit-free equivalent parameters (`equivalent_params`), its memory and time per
        step interpolated in log N between the measured P = 1 sizes: the same loss gain by parameter scaling
        (absent when the ParScale loss lies outside the P = 1 range).
    The paper's claim, per run: a loss gain bought with less extra memory and less extra time per step than
    parameter scaling's, judged against equal_gain where it exists, else against matched (which then either reaches
    the ParScale loss or, with ParScale better than every measured size, is beaten by it)."""
    base = sorted((r for r in rows if r["P"] == 1), key=lambda r: r["params"])
    own_of = {r["d_model"]: r for r in base}
    logN = np.log([b["params"] for b in base])
    out = []
    for r in rows:
        own = own_of.get(r["d_model"])
        larger = [b for b in base if b["params"] > r["params"]]
        if r["P"] == 1 or own is None or not larger:
            continue
        good = [b for b in larger if b["held_out_loss"] <= r["held_out_loss"]]
        match = good[0] if good else min(larger, key=lambda b: abs(b["held_out_loss"] - r["held_out_loss"]))
        n_eq, _ = equivalent_params([b["params"] for b in base], [b["held_out_loss"] for b in base],
                                    r["held_out_loss"]) if len(base) >= 2 else (None, "")
        gain = lambda x, own=own: own["held_out_loss"] - x["held_out_loss"]
        c = {"parscale": r["name"], "base": own["name"], "matched": match["name"],
             "matched_reaches_loss": match["held_out_loss"] <= r["held_out_loss"],
             "loss_gain_parscale": gain(r), "loss_gain_matched": gain(match),
             "params_ratio_matched": match["params"] / own["params"],
             "params_ratio_equal_gain": None if n_eq is None else n_eq / own["params"], "per_batch": {}}
        for B in map(str, batch_sizes):
            t_own = own["throughput"][B]
            pb = {}
            refs = {"parscale": r["throughput"][B], "matched": match["throughput"][B]}
            if n_eq is not None:
                refs["equal_gain"] = {k: float(np.interp(np.log(n_eq), logN, [b["throughput"][B][k] for b in base]))
                                      for k in ("memory_bytes", "ms_per_step")}
            for name, t in refs.items():
                pb[f"memory_increase_{name}"] = t["memory_bytes"] - t_own["memory_bytes"]
                pb[f"latency_increase_{name}_ms"] = t["ms_per_step"] - t_own["ms_per_step"]
                pb[f"latency_ratio_{name}"] = t["ms_per_step"] / t_own["ms_per_step"]
            c["per_batch"][B] = pb
        ref = "equal_gain" if n_eq is not None else "matched"
        pbs = c["per_batch"].values()
        c["claim_reference"] = ref
        c["less_memory"] = all(pb["memory_increase_parscale"] < pb[f"memory_increase_{ref}"] for pb in pbs)
        c["less_latency"] = all(pb["latency_increase_parscale_ms"] < pb[f"latency_increase_{ref}_ms"] for pb in pbs)
        c["claim_holds"] = bool(c["loss_gain_parscale"] > 0 and c["less_memory"] and c["less_latency"])
        out.append(c)
    return out


# ------------------------------------------------------------------------------------------------ study


def seed_noise(cfg, d_model: int, seeds: list[int], workdir: Path, rows, loss_batches, tok, progress) -> dict | None:
    """The seed-to-seed spread of the held-out loss: the runs of cfg.noise.streams at the smallest size retrained
    with each of `seeds` (other init and batches; the held-out set avoids their batches too) beside the main seed's
    run. None without seeds."""
    if not seeds:
        return None
    out = {"d_model": int(d_model), "seeds": [int(cfg.seed), *seeds], "by_P": {}}
    for P in (int(p) for p in cfg.noise.streams):
        main = next(r for r in rows if r["d_model"] == d_model and r["P"] == P)
        losses = [main["held_out_loss"]]
        for seed in seeds:
            run_cfg = run_config(cfg, d_model, P)
            run_cfg.seed = seed
            result = train(run_cfg, workdir / f"{run_name(d_model, P)}_seed{seed}",
                           progress=progress)
            losses.append(held_out_loss(model_config(run_cfg.model, tok.vocab_size), result.params,
                                        loss_batches)["held_out_loss"])
        out["by_P"][str(P)] = {"losses": losses, "std": float(np.std(losses, ddof=1)),
                               "range": float(max(losses) - min(losses))}
    return out


def run_study(cfg, workdir: str | Path, progress: bool = True) -> dict:
    """Train every (size, P) run of cfg, measure them, fit the law; write summary.json, report.md and the plots;
    return the summary."""
    sizes, streams = [int(d) for d in cfg.sizes], [int(p) for p in cfg.streams]
    if 1 not in streams or len(streams) < 2 or len(set(streams)) != len(streams) or min(streams) < 1:
        raise ValueError(f"config.streams={tuple(cfg.streams)} must hold 1 and at least one P > 1, each once")
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"config.sizes={tuple(cfg.sizes)} must be distinct d_model values")
    if int(cfg.eval.held_out) < 1 or int(cfg.eval.greedy_problems) < 1:
        raise ValueError("config.eval.held_out and config.eval.greedy_problems must be >= 1")
    batch_sizes = [int(b) for b in cfg.throughput.batch_sizes]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, workdir, 0)
    t_start, cpu_start = time.time(), time.process_time()
    tok = CharTokenizer()
    task = get_task(cfg.task.name, **as_dict(cfg.task.get("kwargs", {})))
    noise_seeds = [int(x) for x in cfg.noise.seeds]
    if int(cfg.seed) in noise_seeds:
        raise ValueError(f"config.noise.seeds={tuple(cfg.noise.seeds)} must not hold config.seed={cfg.seed}")
    # The training batches of every run (one stream) and of the seed-noise runs: the held-out set avoids them all.
    streams_used = [(int(cfg.train.batch_size), seed, int(cfg.train.steps)) for seed in [int(cfg.seed), *noise_seeds]]
    n_eval = max(int(cfg.eval.held_out), int(cfg.eval.greedy_problems), max(batch_sizes))
    problems, drawn = held_out_problems(task, streams_used, n_eval, int(cfg.eval.seed))
    loss_batches = held_out_batches(tok, problems[: int(cfg.eval.held_out)], int(cfg.eval.batch_size),
                                    int(cfg.train.seq_len))
    prompts = prompt_batch(tok, problems[: max(batch_sizes)])

    rows, histories, samples = [], {}, {}
    for d in sizes:
        for P in streams:
            row, history, smp = _run_one(cfg, d, P, workdir, tok, task, loss_batches,
                                         problems[: int(cfg.eval.greedy_problems)], prompts, progress)
            rows.append(row)
            histories[row["name"]], samples[row["name"]] = history, smp

    noise = seed_noise(cfg, sizes[0], noise_seeds, workdir, rows, loss_batches, tok, progress)
    fit = fit_scaling_law([r["params"] for r in rows], [r["P"] for r in rows], [r["held_out_loss"] for r in rows],
                          **as_dict(cfg.fit))
    for r, pred, res in zip(rows, fit["predicted"], fit["residuals"], strict=True):
        r["fit_loss"], r["fit_residual"] = pred, res
    base = [r for r in rows if r["P"] == 1]
    for r in rows:
        r["loss_change_vs_P1_pct"] = 100 * (r["held_out_loss"] / _p1(rows, r)["held_out_loss"] - 1)
        if r["P"] > 1 and len(base) >= 2:
            n_eq, how = equivalent_params([b["params"] for b in base], [b["held_out_loss"] for b in base],
                                          r["held_out_loss"])
            r["equivalent_params_multiplier"] = None if n_eq is None else n_eq / r["params"]
            r["equivalent_params_note"] = how
    summary = {
        "workdir": str(workdir), "task": as_dict(cfg.task), "sizes": sizes, "streams": streams,
        "train": {"steps": int(cfg.train.steps), "batch_size": int(cfg.train.batch_size),
                  "seq_len": int(cfg.train.seq_len)},
        "held_out": {"loss_problems": int(cfg.eval.held_out), "greedy_problems": int(cfg.eval.greedy_problems),
                     "drawn": drawn},
        "runs": rows, "seed_noise": noise, "fit": fit, "comparisons": comparisons(rows, batch_sizes),
        "throughput_batch_sizes": batch_sizes,
        "backend": jax.default_backend(),
        "wall_minutes_total": (time.time() - t_start) / 60, "cpu_minutes_total": (time.process_time() - cpu_start) / 60,
    }
    summary["what_we_see"] = what_we_see(summary)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_loss(workdir / "loss_vs_P.png", summary)
    plot_throughput(workdir / "throughput.png", summary)
    plot_training(workdir / "training.png", histories, summary)
    write_study_report(workdir / "report.md", summary, samples)
    return summary


def _p1(rows, r):
    return next(b for b in rows if b["d_model"] == r["d_model"] and b["P"] == 1)


# ------------------------------------------------------------------------------------------------ report


def _fmt(x, spec: str, signed: bool = False) -> str:
    return "–" if x is None else format(x, ("+" if signed else "") + spec)


def _kib(b) -> str:
    return f"{b / 1024:.1f}"


def what_we_see(summary: dict) -> list[str]:
    """Observations computed from the summary's numbers (no conclusion fixed in advance)."""
    rows, fit, out = summary["runs"], summary["fit"], []
    streams = [p for p in summary["streams"] if p > 1]
    per_p = {}
    for P in streams:
        ch = [r["loss_change_vs_P1_pct"] for r in rows if r["P"] == P]
        per_p[P] = ch
        lower = sum(c < 0 for c in ch)
        out.append(f"P = {P}: held-out loss lower than P = 1 at {lower} of {len(ch)} sizes (change by size "
                   f"{', '.join(f'{c:+.1f}%' for c in ch)}; mean {np.mean(ch):+.1f}%).")
    noise = summary.get("seed_noise")
    if noise:
        d = noise["d_model"]
        for P, n in noise["by_P"].items():
            gains = [_p1(rows, r)["held_out_loss"] - r["held_out_loss"] for r in rows
                     if r["d_model"] == d and r["P"] > 1]
            std = n["std"]
            out.append(f"Seed noise: d{d}_P{P}'s held-out loss over seeds {noise['seeds']} is "
                       f"{', '.join(f'{x:.4f}' for x in n['losses'])} (std {n['std']:.4f}, range {n['range']:.4f}); "
                       f"the P > 1 gains at d_model {d} ({', '.join(f'{g:+.4f}' for g in gains)})"
                       + (f" are {', '.join(f'{g / std:.1f}' for g in gains)} times that std." if std > 0 else "."))
    if len(streams) >= 2:
        mono = [all(a > b for a, b in zip(grp, grp[1:], strict=False)) for grp in (
            [r["held_out_loss"] for r in sorted((x for x in rows if x["d_model"] == d), key=lambda x: x["P"])]
            for d in summary["sizes"])]
        out.append(f"Loss falls monotonically with P at {sum(mono)} of {len(mono)} sizes.")
    base = sorted((r for r in rows if r["P"] == 1), key=lambda r: r["params"])
    if len(base) >= 2:
        falls = all(a["held_out_loss"] > b["held_out_loss"] for a, b in zip(base, base[1:], strict=False))
        out.append(f"At P = 1 the loss {'falls' if falls else 'does not fall monotonically'} with size: "
                   + ", ".join(f"{r['name']} {r['held_out_loss']:.4f} ({r['params'] / 1e3:.1f}K params)" for r in base)
                   + ".")
    mult = ", ".join(f"P = {p}: ×{m:.2f}" for p, m in fit["param_multiplier"].items() if p != "1")
    edge = [n for n, e in (("k", fit["k_at_grid_edge"]), ("α", fit["alpha_at_grid_edge"])) if e]
    if fit.get("E_at_bound"):
        edge.append("E (at its bound 0)")
    edge_text = f"; {' and '.join(edge)} at the edge of its allowed range: not pinned down by the data" if edge else ""
    out.append(f"Fit over {fit['points']} runs: E = {fit['E']:.4f}, log10 A = {_fmt(fit['log10_A'], '.2f')}, "
               f"k = {fit['k']:.3f}, α = {fit['alpha']:.3f}; RMSE {fit['rmse']:.4f} nats, max |residual| "
               f"{fit['max_abs_residual']:.4f}, R² {_fmt(fit['r2'], '.3f')}"
               + edge_text
               + f". Implied parameter multiplier k ln P + 1: {mult} (the paper's Pile fit: ×1.23 at P = 2, ×1.46 at "
               f"P = 4, i.e. k ≈ 0.33).")
    eq = [(r["name"], r.get("equivalent_params_multiplier"), r.get("equivalent_params_note")) for r in rows
          if r["P"] > 1 and "equivalent_params_note" in r]
    if eq:
        out.append("Fit-free, interpolating the P = 1 losses in log N: " + "; ".join(
            f"{n} ≈ ×{m:.2f} base params" if m is not None else f"{n}: {how} than the measured P = 1 range"
            for n, m, how in eq) + ".")
    for B in map(str, summary["throughput_batch_sizes"]):
        for P in streams:
            ratios = [r["throughput"][B]["tokens_per_s"] / _p1(rows, r)["throughput"][B]["tokens_per_s"]
                      for r in rows if r["P"] == P]
            out.append(f"Decoding at batch {B}: P = {P} runs at {', '.join(f'{x:.2f}' for x in ratios)}× the "
                       f"tokens/s of P = 1 (by size), with {P}× the KV cache.")
    comps = summary["comparisons"]
    if comps:
        for c in comps:
            parts = []
            for B, pb in c["per_batch"].items():
                eq = (f", equal-gain estimate +{_kib(pb['memory_increase_equal_gain'])} KiB / "
                      f"×{pb['latency_ratio_equal_gain']:.2f}" if "memory_increase_equal_gain" in pb else "")
                parts.append(f"batch {B}: ParScale +{_kib(pb['memory_increase_parscale'])} KiB memory / "
                             f"×{pb['latency_ratio_parscale']:.2f} time per step, {c['matched']} "
                             f"+{_kib(pb['memory_increase_matched'])} KiB / ×{pb['latency_ratio_matched']:.2f}{eq}")
            reach = "reaches" if c["matched_reaches_loss"] else "does not reach"
            eq = ("" if c["params_ratio_equal_gain"] is None else
                  f"; the same gain by parameter scaling ≈ ×{c['params_ratio_equal_gain']:.2f} params")
            verdict = ("claim holds" if c["claim_holds"] else "claim does not hold") + (
                f" against the {c['claim_reference'].replace('_', '-')} reference: "
                f"{'less' if c['less_memory'] else 'not less'} memory, {'less' if c['less_latency'] else 'not less'} "
                f"latency")
            out.append(f"{c['parscale']} (gain {c['loss_gain_parscale']:+.4f} nats over {c['base']}{eq}) vs "
                       f"{c['matched']} (×{c['params_ratio_matched']:.2f} params, gain {c['loss_gain_matched']:+.4f}; "
                       f"it {reach} the ParScale loss): " + "; ".join(parts) + f" — {verdict}.")
        holds = [c["parscale"] for c in comps if c["claim_holds"]]
        useful = sum(c["loss_gain_parscale"] > 0 for c in comps)
        mem = sum(c["less_memory"] for c in comps)
        lat = sum(c["less_latency"] for c in comps)
        out.append(f"The paper's claim (P streams buy a loss gain for less extra memory and latency than a larger "
                   f"model of similar loss) holds here for {len(holds)} of {len(comps)} ParScale runs"
                   + (f" ({', '.join(holds)})" if holds else "")
                   + f": {useful} improve on their own P = 1 model, {mem} add less memory and {lat} less time per "
                   f"step than parameter scaling (equal-gain estimate, else the matched model) at every batch size "
                   f"measured.")
    weights = [r["weight_bytes"] / t["memory_bytes"] for r in rows for t in r["throughput"].values()]
    out.append(f"Memory here is weights + KV cache: the weights are {100 * min(weights):.0f}–{100 * max(weights):.0f}% "
               f"of it across runs and batch sizes.")
    Bs = [str(b) for b in summary["throughput_batch_sizes"]]
    if len(Bs) >= 2:
        lo, hi = Bs[0], Bs[-1]
        growth = [r["throughput"][hi]["ms_per_step"] / r["throughput"][lo]["ms_per_step"] for r in rows]
        out.append(f"A decode step at batch {hi} takes ×{min(growth):.2f}–×{max(growth):.2f} the time of one at batch "
                   f"{lo} ({int(hi) // max(int(lo), 1)}× the rows) on {summary['backend']}.")
    rates = [r["throughput"][b]["flops_per_token"] * r["throughput"][b]["tokens_per_s"] / 1e9 for r in rows for b in Bs]
    out.append(f"Decoding runs at {min(rates):.2f}–{max(rates):.2f} GFLOP/s (counted FLOPs per token × tokens/s).")
    flop_ratio = lambda P: np.mean([r["train_flops_per_token"] / _p1(rows, r)["train_flops_per_token"]
                                    for r in rows if r["P"] == P])
    flops = ", ".join(f"P = {P}: ×{flop_ratio(P):.2f}" for P in streams)
    out.append(f"Training cost at equal steps and tokens: forward FLOPs per token vs P = 1 (mean over sizes) {flops}.")
    acc = ", ".join(f"{r['name']} {r['accuracy']:.3f}" for r in rows)
    out.append(f"Greedy held-out accuracy: {acc}.")
    return out


def write_study_report(path: Path, summary: dict, samples: dict):
    fit, t = summary["fit"], summary["train"]
    B_list = [str(b) for b in summary["throughput_batch_sizes"]]
    lines = [
        "# ParScale: P parallel streams at equal base parameters", "",
        f"Task `{summary['task']['name']}` {json.dumps(summary['task'].get('kwargs', {}))}; every run trained from "
        f"scratch on the same {t['steps']} steps × {t['batch_size']} rows × {t['seq_len']} tokens (same batches); "
        f"held-out loss = teacher-forced cross-entropy (nats per target token) on "
        f"{summary['held_out']['loss_problems']} problems unseen in training, accuracy = greedy exact answer on "
        f"{summary['held_out']['greedy_problems']} of them. N = base (non-ParScale) parameters, embeddings "
        f"included. Decoding: greedy, fixed length, best of the timed calls after a warm-up, on "
        f"`{summary['backend']}`; memory = weights + KV cache of the call. "
        f"Wall time {summary['wall_minutes_total']:.1f} min.", "",
        "| run | d_model | P | N (base params) | ParScale params | held-out loss | vs P=1 | fit | residual | "
        "token acc | greedy acc | train loss (last 3 logs) | "
        + " | ".join(f"tok/s @B={B} | KV KiB @B={B}" for B in B_list) + " | weights KiB | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(B_list) + "---|---|",
    ]
    for r in summary["runs"]:
        tp = "".join(f" {r['throughput'][B]['tokens_per_s']:.0f} | {_kib(r['throughput'][B]['kv_bytes'])} |"
                     for B in B_list)
        lines.append(f"| {r['name']} | {r['d_model']} | {r['P']} | {r['params']} | {r['parscale_params']} | "
                     f"{r['held_out_loss']:.4f} | {r['loss_change_vs_P1_pct']:+.1f}% | {r['fit_loss']:.4f} | "
                     f"{r['fit_residual']:+.4f} | "
                     f"{r['held_out_token_accuracy']:.3f} | {r['accuracy']:.3f} | {r['train_loss_final']:.4f} |{tp} "
                     f"{_kib(r['weight_bytes'])} | {r['train_minutes']:.1f} |")
    lines += ["", "## Fit: L = E + (A / (N (k ln P + 1)))^α", "",
              "| E | log10 A | k | α | RMSE | max abs residual | R² | " + " | ".join(
                  f"k ln {p} + 1" for p in fit["param_multiplier"] if p != "1") + " |",
              "|---|---|---|---|---|---|---|" + "---|" * (len(fit["param_multiplier"]) - 1),
              f"| {fit['E']:.4f} | {_fmt(fit['log10_A'], '.2f')} | {fit['k']:.3f} | {fit['alpha']:.3f} | "
              f"{fit['rmse']:.4f} | {fit['max_abs_residual']:.4f} | {_fmt(fit['r2'], '.3f')} | " + " | ".join(
                  f"{m:.2f}" for p, m in fit["param_multiplier"].items() if p != "1") + " |", "",
              f"Per-run fitted losses and residuals (measured − fit) are in the first table; {fit['points']} points, "
              "4 free parameters (E, A, k, α).", ""]
    if summary["comparisons"]:
        lines += ["## ParScale vs parameter scaling", "",
                  "Increases over each run's own P = 1 model: memory (KiB) and time per decode step (×). `matched`: "
                  "the measured larger P = 1 model (the smallest reaching the ParScale loss, else the closest); `eq`: "
                  "a P = 1 model of the same loss gain, its params found by interpolating the P = 1 losses in log N "
                  "and its costs interpolated the same way (– outside the measured range).", "",
                  "| ParScale run | matched P=1 | gain PS | gain matched | params × matched | params × eq | "
                  + " | ".join(f"Δmem @B={B} PS / matched / eq | step × @B={B} PS / matched / eq" for B in B_list)
                  + " | claim |", "|---|---|---|---|---|---|" + "---|---|" * len(B_list) + "---|"]
        for c in summary["comparisons"]:
            eq_mem = lambda pb: _kib(pb["memory_increase_equal_gain"]) if "memory_increase_equal_gain" in pb else "–"
            eq_lat = lambda pb: _fmt(pb.get("latency_ratio_equal_gain"), ".2f")
            cells = "".join(
                f" {_kib(pb['memory_increase_parscale'])} / {_kib(pb['memory_increase_matched'])} / {eq_mem(pb)} | "
                f"{pb['latency_ratio_parscale']:.2f} / {pb['latency_ratio_matched']:.2f} / {eq_lat(pb)} |"
                for pb in c["per_batch"].values())
            lines.append(f"| {c['parscale']} | {c['matched']} | {c['loss_gain_parscale']:+.4f} | "
                         f"{c['loss_gain_matched']:+.4f} | {c['params_ratio_matched']:.2f} | "
                         f"{_fmt(c['params_ratio_equal_gain'], '.2f')} |{cells} "
                         f"{'holds' if c['claim_holds'] else 'no'} ({c['claim_reference'].replace('_', '-')}) |")
        lines.append("")
    lines += ["## What we see", ""] + [f"- {s}" for s in summary["what_we_see"]] + [
        "", "![loss vs P](loss_vs_P.png)", "", "![throughput](throughput.png)", "", "![training](training.png)", "",
        "## Greedy samples (the first held-out problems)", "", "| run | prompt | completion | score |",
        "|---|---|---|---|"]
    lines += sample_rows(samples)
    path.write_text("\n".join(lines) + "\n")


def plot_loss(path: Path, summary: dict):
    """Held-out loss vs P per size with the fitted law, and vs the fit's effective parameters N (k ln P + 1)."""
    plt = pyplot()
    fit, rows = summary["fit"], summary["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    law = lambda n_eff: fit["E"] + fit["c"] * np.asarray(n_eff, float) ** -fit["alpha"]
    Ps = np.linspace(1, max(summary["streams"]), 50)
    for i, d in enumerate(summary["sizes"]):
        rs = sorted((r for r in rows if r["d_model"] == d), key=lambda r: r["P"])
        axes[0].plot([r["P"] for r in rs], [r["held_out_loss"] for r in rs], "o", color=f"C{i}",
                     label=f"d_model {d} ({rs[0]['params'] / 1e3:.1f}K)")
        axes[0].plot(Ps, law(rs[0]["params"] * (fit["k"] * np.log(Ps) + 1)), "-", color=f"C{i}", alpha=0.6)
        n_eff = [r["params"] * (fit["k"] * np.log(r["P"]) + 1) for r in rs]
        for r, x in zip(rs, n_eff, strict=True):
            axes[1].scatter(x, r["held_out_loss"], color=f"C{i}", marker="os^D"[min(int(np.log2(r["P"])), 3)])
    xs = np.geomspace(min(r["params"] for r in rows) * 0.9,
                      max(r["params"] * (fit["k"] * np.log(r["P"]) + 1) for r in rows) * 1.1, 100)
    axes[1].plot(xs, law(xs), "k-", lw=1, label=f"fit: k={fit['k']:.2f}, α={fit['alpha']:.2f}, E={fit['E']:.3f}")
    axes[0].set(xscale="log", xlabel="P (streams)", ylabel="held-out loss (nats/token)",
                title="held-out loss vs P (lines: the fitted law)")
    axes[0].set_xticks(summary["streams"], [str(p) for p in summary["streams"]])
    axes[0].minorticks_off()
    axes[1].set(xscale="log", xlabel="N (k ln P + 1)", ylabel="held-out loss", title="loss vs fitted effective params"
                " (o P=1, s P=2, ^ P=4)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(path: Path, summary: dict):
    """Decode tokens/s and memory (weights + KV) vs P per size, one panel per batch size plus memory."""
    plt = pyplot()
    Bs = [str(b) for b in summary["throughput_batch_sizes"]]
    fig, axes = plt.subplots(1, len(Bs) + 1, figsize=(4.2 * (len(Bs) + 1), 3.8))
    for i, d in enumerate(summary["sizes"]):
        rs = sorted((r for r in summary["runs"] if r["d_model"] == d), key=lambda r: r["P"])
        Ps = [r["P"] for r in rs]
        for ax, B in zip(axes, Bs, strict=False):
            ax.plot(Ps, [r["throughput"][B]["tokens_per_s"] for r in rs], "o-", color=f"C{i}", label=f"d_model {d}")
        axes[-1].plot(Ps, [r["throughput"][Bs[-1]]["memory_bytes"] / 1024 for r in rs], "o-", color=f"C{i}",
                      label=f"d_model {d}")
    for ax, B in zip(axes, Bs, strict=False):
        ax.set(xscale="log", xlabel="P", ylabel="tokens/s", title=f"decode throughput, batch {B}")
        ax.set_xticks(summary["streams"], [str(p) for p in summary["streams"]])
        ax.minorticks_off()
    axes[-1].set(xscale="log", xlabel="P", ylabel="KiB", title=f"weights + KV cache, batch {Bs[-1]}")
    axes[-1].set_xticks(summary["streams"], [str(p) for p in summary["streams"]])
    axes[-1].minorticks_off()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(path: Path, histories: dict[str, list[dict]], summary: dict):
    """Training loss per step of every run (colour: size, line style: P)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {P: s for P, s in zip(summary["streams"], ["-", "--", ":", "-."] * 4, strict=False)}
    for r in summary["runs"]:
        h = [x for x in histories[r["name"]] if "loss" in x]
        ax.plot([x["step"] for x in h], [x["loss"] for x in h], styles[r["P"]],
                color=f"C{summary['sizes'].index(r['d_model'])}", label=r["name"], lw=1)
    ax.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss (colour: d_model, style: P)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    workdir = Path(FLAGS.workdir or Path("runs/parscale") / time.strftime("%Y%m%d-%H%M%S"))
    summary = run_study(FLAGS.config, workdir)
    for r in summary["runs"]:
        tp = ", ".join(f"{t['tokens_per_s']:.0f} tok/s @B={B}" for B, t in r["throughput"].items())
        print(f"{r['name']:>8}: held-out loss {r['held_out_loss']:.4f} ({r['loss_change_vs_P1_pct']:+.1f}%), "
              f"accuracy {r['accuracy']:.3f}, {tp}")
    f = summary["fit"]
    print(json.dumps({"workdir": str(workdir), "fit": {k: f[k] for k in ("E", "log10_A", "k", "alpha", "rmse", "r2")},
                      "wall_minutes": round(summary["wall_minutes_total"], 2)}))
    print(f"report: {workdir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
