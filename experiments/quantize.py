"""Weight-only quantization study (issue 13): the quickstart model's held-out greedy accuracy and weight bytes with
its attention, MLP and LM-head matrices in f32, int8, int4, 2-bit and mixed 2/4-bit (`lmx.models.quantize_params`),
written to runs/quantize/<time>/report.md + summary.json.

python -m experiments.quantize [--config=experiments/configs/quantize.py] [--config.init_from=runs/quickstart/<time>]
    [--config.quant.group=64] [--config.quant.formats=int8,int4]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from lmx.data import CharTokenizer, get_task, held_out_problems
from lmx.models import QuantizedWeight, build, quantize_params
from lmx.train.loop import as_dict, load_run, model_config, train, write_config
from lmx.train.report import quiet_orbax
from lmx.train.sft import evaluate

FLAGS = flags.FLAGS


def define_flags():
    """--config and --workdir, only when run as a script (other code may import the module)."""
    config_flags.DEFINE_config_file("config", "experiments/configs/quantize.py", "Quantization config.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (default runs/quantize/<timestamp>).")

FORMATS = {"int8": 8, "int4": 4, "int2": 2, "mixed": "mixed"}


def matrix_bytes(params) -> tuple[int, int]:
    """(bytes, weights) of the matrices quantize_params replaces: packed codes + scales + offsets (+ slots) of each
    QuantizedWeight, and how many weights they stand for."""
    qws = [w for w in jax.tree.leaves(params, is_leaf=lambda w: isinstance(w, QuantizedWeight))
           if isinstance(w, QuantizedWeight)]
    return sum(w.nbytes for w in qws), sum(int(np.prod(w.stack_shape + w.shape)) for w in qws)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    cfg = FLAGS.config
    q = cfg.quant
    formats = [f for f in str(q.formats).split(",") if f]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"config.quant.formats: unknown {sorted(unknown)}; choose from {sorted(FORMATS)}")
    run_dir = Path(FLAGS.workdir or Path("runs/quantize") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir, 0)
    t0 = time.time()
    tok = CharTokenizer()
    if cfg.init_from:
        src = Path(cfg.init_from)
        rcfg, model, params = load_run(src, tok.vocab_size)
    else:
        src, rcfg = run_dir / "quickstart", cfg
        params = train(cfg, src).params
        model = build(model_config(cfg.model, tok.vocab_size))
    train_min = (time.time() - t0) / 60
    task = get_task(rcfg.task.name, **as_dict(rcfg.task.get("kwargs", {})))
    stream = (int(rcfg.train.batch_size), int(rcfg.seed), int(rcfg.train.steps))
    problems, drawn = held_out_problems(task, [stream], int(cfg.eval.held_out), int(cfg.eval.seed))

    dense = quantize_params(model, params, 8, int(q.group), head=bool(q.head))  # which matrices, and how many
    _, n_weights = matrix_bytes(dense)
    rows = []
    for name in ["f32", *formats]:
        t1 = time.time()
        qp = params if name == "f32" else quantize_params(model, params, FORMATS[name], int(q.group),
                                                          frac4=float(q.frac4), head=bool(q.head))
        nbytes = 4 * n_weights if name == "f32" else matrix_bytes(qp)[0]
        ev = evaluate(model, qp, task, tok, problems, int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
        rows.append({"format": name, "accuracy": ev["accuracy"], "gen_tokens": ev["gen_tokens"],
                     "matrix_bytes": nbytes, "bits_per_weight": 8 * nbytes / n_weights,
                     "total_param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(qp)),
                     "eval_s": round(time.time() - t1, 1)})
        rows[-1]["points_vs_f32"] = 100 * (rows[-1]["accuracy"] - rows[0]["accuracy"])
        logging.info("%s", rows[-1])
    minutes = (time.time() - t0) / 60
    summary = {"run_dir": str(run_dir), "model_from": str(src), "held_out": len(problems), "group": int(q.group),
               "frac4": float(q.frac4), "head": bool(q.head), "quantized_weights": n_weights,
               "backend": jax.default_backend(), "train_minutes": round(train_min, 2), "minutes": round(minutes, 2),
               "rows": rows}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Weight-only quantization of the quickstart model (`{run_dir.name}`)", "",
             f"Model: `{src}` ({'trained here' if not cfg.init_from else 'its latest checkpoint'}). "
             f"{len(problems)} held-out problems whose prompts never occur in training ({drawn} drawn), greedy "
             f"decoding, exact verifier. Quantized: the attention q/k/v/o, MLP"
             f"{' and LM-head' if q.head else ''} matrices ({n_weights} weights), groups of {q.group} input rows, "
             f"per-group bf16 scale and offset; embeddings and norms stay f32. Mixed: 2-bit with "
             f"round({q.frac4}·groups) 4-bit groups per 128-column tile (the widest). Backend "
             f"{jax.default_backend()} (the XLA reference path off a GPU).", "",
             "| format | accuracy | vs f32 (points) | mean generated tokens | matrix bytes | bits / weight |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['accuracy']:.3f} | {r['points_vs_f32']:+.1f} | {r['gen_tokens']:.1f} | "
              f"{r['matrix_bytes']:,} | {r['bits_per_weight']:.2f} |" for r in rows]
    lines += ["", f"Wall time: {train_min:.1f} min {'training' if not cfg.init_from else 'loading'}, "
              f"{minutes:.1f} min in all."]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
