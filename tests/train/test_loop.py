import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs.sft import get_config
from lmx.train import Checkpointer, read_metrics
from lmx.train.loop import model_config, train
from tests.train.conftest import tiny_config


def _curve(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(run_dir)]


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_cfg):
    full = train(tiny_cfg, tmp_path / "full", progress=False)
    assert [r["step"] for r in full.history] == list(range(1, 9))
    run = tmp_path / "killed"
    part = train(tiny_cfg, run, stop_at=5, progress=False)  # checkpoint at 3; steps 4, 5 are lost work
    assert [r["step"] for r in part.history] == [1, 2, 3, 4, 5]
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]
    resumed = train(tiny_cfg, run, progress=False)
    assert _curve(run) == _curve(tmp_path / "full")  # bit-for-bit: floats compared with ==
    for a, b in zip(_leaves(resumed.params), _leaves(full.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.state.step) == 8
    for name in ("config.json", "metrics.jsonl"):
        assert (run / name).exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 8


def _hashes(directory: Path):
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_cfg):
    tiny_cfg.train.ckpt_every = 2
    run = tmp_path / "run"
    train(tiny_cfg, run, stop_at=4, progress=False)  # checkpoints at 2 and 4
    before = _hashes(run / "checkpoints")

    def poison(step, batch):
        if step == 6:  # a checkpoint step: its state must not be saved
            batch = {**batch, "loss_mask_BT": batch["loss_mask_BT"] * np.float32("nan")}
        return batch

    with pytest.raises(FloatingPointError, match=r"step 6: loss=nan, grad_norm=nan.*last good checkpoint: step 4"):
        train(tiny_cfg, run, batch_hook=poison, progress=False)
    assert _hashes(run / "checkpoints") == before
    assert max(r["step"] for r in read_metrics(run)) == 5
    # The run can be resumed from the good checkpoint (here without the poison) and finishes.
    result = train(tiny_cfg, run, progress=False)
    assert int(result.state.step) == 8 and np.isfinite(result.history[-1]["loss"])


def test_default_config_and_overrides():
    cfg = get_config()
    mc = model_config(cfg.model, 104)
    assert (mc.d_model, mc.num_layers, mc.attention.num_kv_heads, mc.vocab_size) == (64, 2, 2, 104)
    cfg.train.steps = 123  # FieldReference: the optimizer's horizon follows
    assert cfg.optim.total_steps == 123
    gpu = get_config("gpu")
    assert gpu.train.steps == gpu.optim.total_steps == 5000
    bad = tiny_config()
    bad.model.unlock()
    bad.model.n_layers = 3
    with pytest.raises(ValueError, match="n_layers"):
        model_config(bad.model, 104)
