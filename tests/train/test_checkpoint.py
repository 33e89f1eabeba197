import jax
import numpy as np
import pytest

from lmx.models import build, preset
from lmx.train import Checkpointer, OptimConfig, TrainState, abstract_state, make_optimizer


@pytest.fixture(scope="module")
def setup():
    """A TrainState of random values in every leaf (built from the abstract state: nothing to compile)."""
    model = build(preset("llama-tiny", d_model=32, mlp_dim=64))
    optimizer = make_optimizer(OptimConfig())
    rng = np.random.default_rng(0)

    def fill(s):
        integer = np.issubdtype(s.dtype, np.integer)
        x = rng.integers(0, 1 << 16, s.shape) if integer else rng.standard_normal(s.shape)
        return jax.device_put(x.astype(s.dtype), s.sharding)

    return model, optimizer, jax.tree.map(fill, abstract_state(model, optimizer))


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_keep(tmp_path, setup):
    model, optimizer, state = setup
    with Checkpointer(tmp_path, every=2, keep=2) as ckpt:
        assert not ckpt.save(1, state, {"data_step": 1})  # not a multiple of `every`
        for step in (2, 4, 6):
            assert ckpt.save(step, state, {"data_step": step})
        assert ckpt.save(7, state, {"data_step": 7}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]  # keep=2: the oldest were deleted
        restored, data = ckpt.restore_latest(abstract_state(model, optimizer))
    assert isinstance(restored, TrainState) and data == {"data_step": 7}
    _assert_equal(restored, state)
    # A fresh manager over the same directory sees the same checkpoints (what a resumed job does).
    with Checkpointer(tmp_path, every=2, keep=2) as again:
        assert again.latest_step() == 7
        restored6, data6 = again.restore(6, state)  # a concrete state also works as the target
        _assert_equal(restored6, state)
        assert data6 == {"data_step": 6}


def test_empty_dir_and_mismatch(tmp_path, setup):
    model, optimizer, state = setup
    with Checkpointer(tmp_path / "a") as ckpt:
        assert ckpt.restore_latest(abstract_state(model, optimizer)) is None
        ckpt.save(1000, state)
    wider = build(preset("llama-tiny", d_model=48, mlp_dim=64))
    with Checkpointer(tmp_path / "a") as ckpt, pytest.raises(ValueError, match=r"params\.embed\.embedding: saved"):
        ckpt.restore_latest(abstract_state(wider, optimizer))
