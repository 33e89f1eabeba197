"""Run reports shared by experiments and notebooks: report.md with final metrics and samples, loss.png."""

from __future__ import annotations

import logging as std_logging
from pathlib import Path

from absl import logging


def write_report(run_dir: Path, history: list[dict], final_eval: dict | None, title: str | None = None,
                 notes: list[str] | None = None, num_samples: int = 8):
    """Write run_dir/report.md (metrics, eval results, sample completions) and run_dir/loss.png."""
    run_dir = Path(run_dir)
    train_rows = [r for r in history if "loss" in r]
    eval_rows = [r for r in history if "eval/accuracy" in r]
    lines = [f"# {title or 'SFT run'} (`{run_dir.name}`)", ""]
    if train_rows:
        lines.append(f"- steps: {train_rows[-1]['step']}, final train loss: {train_rows[-1]['loss']:.4f}")
    for r in eval_rows:
        lines.append(f"- step {r['step']}: exact-answer accuracy {r['eval/accuracy']:.3f}, "
                     f"mean generated tokens {r['eval/gen_tokens']:.1f}, mean CoT tokens {r['eval/cot_tokens']:.1f}")
    if final_eval:
        lines.append(f"- final evaluation, {len(final_eval['samples'])} problems, greedy decoding, exact verifier: "
                     f"accuracy {final_eval['accuracy']:.3f}, mean generated tokens {final_eval['gen_tokens']:.1f}, "
                     f"mean CoT tokens {final_eval['cot_tokens']:.1f}")
    lines += [f"- {n}" for n in notes or []]
    if train_rows:
        lines += ["", "![train loss](loss.png)"]
    if final_eval:
        lines += ["", "## Sample generations", "", "| prompt | completion | answer | score |", "|---|---|---|---|"]
        for s in final_eval["samples"][:num_samples]:
            cells = [s["prompt"], s["completion"], s["answer"], f"{s['score']:.0f}"]
            lines.append("| " + " | ".join(f"`{c}`".replace("|", "\\|") for c in cells) + " |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    if train_rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
        ax.set(xlabel="step", ylabel="train loss", yscale="log", title=title or "SFT")
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=120)
        plt.close(fig)


def quiet_orbax():
    """Orbax logs every save at INFO; keep only its warnings and errors."""
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), for the reports' and studies' PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_rows(samples: dict) -> list[str]:
    """Markdown table rows `| name | prompt | completion | score |` of {name: [sample dicts]} (pipes escaped)."""
    return [f"| {name} | " + " | ".join(f"`{c}`".replace("|", "\\|") for c in (s["prompt"], s["completion"],
                                                                              f"{s['score']:.0f}")) + " |"
            for name, rows in samples.items() for s in rows]

