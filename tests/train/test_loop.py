import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

from experiments.configs.sft import get_config
from lmx.train import Checkpointer, read_metrics
from lmx.train.loop import model_config, train
from tests.train.conftest import tiny_config


def _curve(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(run_dir)]


def _host(state):
    """Every leaf of a TrainState on the host (the step donates device buffers)."""
    return jax.tree.map(np.asarray, state)


def _assert_same_state(got, want):
    """The whole TrainState, leaf by leaf: params, optimizer state (moments and counts), step and rng,
    each compared bit-for-bit with its dtype and shape."""
    got = _host(got)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))  # e.g. ".rng"


def _hashes(directory: Path):
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 8-step run the resume tests must reproduce: (loss curve, final TrainState on the host)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    full = train(tiny_config(), run, progress=False)
    assert [r["step"] for r in full.history] == list(range(1, 9))
    return _curve(run), _host(full.state)


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_cfg, uninterrupted):
    curve, final = uninterrupted
    run = tmp_path / "killed"
    part = train(tiny_cfg, run, stop_at=5, progress=False)  # checkpoint at 3; steps 4, 5 are lost work
    assert [r["step"] for r in part.history] == [1, 2, 3, 4, 5]
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]
    resumed = train(tiny_cfg, run, progress=False)
    assert _curve(run) == curve  # bit-for-bit: floats compared with ==
    _assert_same_state(resumed.state, final)
    assert int(resumed.state.step) == 8
    # The SFT loss ignores the rng, so only the state comparison sees a resume that loses it; the key has
    # also moved on from the initial one (a split per step), so a resume that re-made it from the seed fails.
    assert not np.array_equal(final.rng, np.asarray(jax.random.split(jax.random.PRNGKey(tiny_cfg.seed))[1]))
    for name in ("config.json", "metrics.jsonl"):
        assert (run / name).exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 8


@pytest.mark.parametrize("left_behind", ["orbax_tmp_dir", "uncommitted_step_dir"])
def test_resume_after_dying_mid_save_uses_last_complete_checkpoint(tmp_path, tiny_cfg, uninterrupted, left_behind):
    """A run killed while saving step 6 leaves a partial checkpoint: on a local disk orbax's temporary
    directory `6.orbax-checkpoint-tmp-<time>`; where a save writes in place (commit-file atomicity, e.g.
    GCS) a `6/` without commit_success.txt. Resuming must restore step 3, the last complete one,
    reproduce the uninterrupted run exactly, and leave every file already on disk as it was."""
    curve, final = uninterrupted
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    train(tiny_cfg, run, stop_at=6, progress=False)  # checkpoints 3 and 6 (no final save: killed after 6)
    # Cut checkpoint 6 back to what a save killed part-way leaves: no commit marker, no data item,
    # part of the state's files missing (here: everything but its metadata).
    six = ckpts / "6"
    for marker in six.rglob("commit_success.txt"):
        marker.unlink()
    shutil.rmtree(six / "data")
    for child in (six / "state").iterdir():
        if child.name != "_METADATA":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if left_behind == "orbax_tmp_dir":
        six = six.rename(ckpts / f"6{ocp.path.atomicity.TMP_DIR_SUFFIX}-1700000000000000")
    complete = _hashes(ckpts / "3")
    partial = _hashes(six)
    assert partial and not any(name.endswith("commit_success.txt") for name in partial)
    with Checkpointer(ckpts) as ckpt:
        assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3

    resumed = train(tiny_cfg, run, progress=False)
    assert [r["step"] for r in resumed.history] == list(range(1, 9))  # 4..6 redone from checkpoint 3
    assert _curve(run) == curve
    _assert_same_state(resumed.state, final)
    # Nothing overwritten: checkpoint 3 is byte-for-byte (and mtime-for-mtime) what it was, and the
    # partial save is still on disk, unread and unchanged, beside the new complete step 6.
    assert _hashes(ckpts / "3") == complete
    kept = [d for d in ckpts.iterdir() if d.is_dir() and not d.name.isdigit() and _hashes(d) == partial]
    assert len(kept) == 1, sorted(d.name for d in ckpts.iterdir())
    with Checkpointer(ckpts) as ckpt:
        assert ckpt.all_steps() == [3, 6, 8]
        state6, data6 = ckpt.restore(6, resumed.state)
    assert data6 == {"data_step": 6} and int(state6.step) == 6


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
    # impl (lmx.pallas's switch) reaches the attention and a Mamba-2 SSM; Mamba-3 has no kernel.
    assert (mc.attention.impl, mc.ssm) == ("xla", None)
    for name, ssm_impl in (("hybrid-tiny", "pallas"), ("mamba3-tiny", "xla")):
        mc = model_config(ConfigDict({"preset": name, "impl": "pallas"}), 104)
        assert (mc.attention.impl, mc.ssm.impl) == ("pallas", ssm_impl)
    # Every study's model configs carry the switch, so --config.model.impl=... works under lock_config.
    import importlib
    import pkgutil

    import experiments.configs

    def models(cfg, path=""):
        for k, v in cfg.items():
            if isinstance(v, ConfigDict):
                yield from [(path + k, v)] if k == "model" and "preset" in v else models(v, f"{path}{k}.")

    for m in pkgutil.iter_modules(experiments.configs.__path__):
        found = list(models(importlib.import_module(f"experiments.configs.{m.name}").get_config()))
        assert found and all(v.impl == "xla" for _, v in found), (m.name, [p for p, _ in found])
    bad = tiny_config()
    bad.model.unlock()
    bad.model.n_layers = 3
    with pytest.raises(ValueError, match="n_layers"):
        model_config(bad.model, 104)
