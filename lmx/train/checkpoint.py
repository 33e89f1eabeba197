"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

Each step directory holds the TrainState pytree (`state`) and a small JSON (`data`) with the position of
the data iterator. Orbax writes into a temporary directory (`<step>.orbax-checkpoint-tmp-<time>`) and, when
complete, writes `commit_success.txt` into it and renames it to `<step>`, so a killed run leaves a whole
checkpoint or a temporary directory that is never read. A step counts only if its directory holds
`commit_success.txt` (on stores without atomic rename, e.g. GCS, that file is the only sign a save finished):
a `<step>` directory without it (a save cut short there, or a copy cut short) is skipped, and moved aside to
`<step>.incomplete-<time>`, untouched, when this run saves that step again. `keep` bounds how many are
retained (oldest deleted).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import SingleDeviceSharding

# Steps are listed only once committed (see the module docstring); saving is unchanged (atomic rename locally).
_COMMITTED_STEPS = ocp.step.standard_name_format(temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath)


class Checkpointer:
    def __init__(self, directory: str | Path, every: int = 1000, keep: int | None = 3, async_save: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint every={every} must be >= 1")
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint keep={keep} must be None or >= 1")
        self.directory = Path(directory).absolute()
        self.every = every
        # The interval is checked here (orbax would also save the first step it sees, whatever it is).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               step_name_format=_COMMITTED_STEPS)
        # Handlers named up front, so a fresh manager can read an existing directory's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state, data_state: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Save if `step` is a multiple of `every` (or `force`); True if a save started. The device
        arrays are copied to host before this returns, so the caller may donate `state` afterwards."""
        if not force and step % self.every:
            return False
        self._move_aside_incomplete(int(step))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self._mgr.save(int(step), args=args, force=True)

    def _move_aside_incomplete(self, step: int):
        """An uncommitted `<step>` directory (skipped on restore) would block the rename that finishes
        this save; it is renamed, not deleted: nothing on disk is removed or overwritten."""
        path = self.directory / str(step)
        if not path.exists() or step in self._mgr.all_steps():
            return
        aside = path.with_name(f"{step}.incomplete-{time.time_ns()}")
        path.rename(aside)
        logging.warning("checkpoint directory %s has no commit_success.txt (a save that did not finish); "
                        "moved it to %s before saving step %d again", path, aside, step)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state, data_state) of `step`, placed into the shardings of `abstract_state` (a pytree of
        ShapeDtypeStructs, e.g. `lmx.train.abstract_state(...)`, or of arrays to mirror)."""
        target = jax.tree.map(_abstract, abstract_state)
        self._check_shapes(step, target)
        out = self._mgr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out.state, dict(out.data or {})

    def restore_latest(self, abstract_state) -> tuple[Any, dict[str, Any]] | None:
        step = self.latest_step()
        complete = set(self.all_steps())
        skipped = sorted(int(p.name) for p in self.directory.iterdir()
                         if p.name.isdigit() and p.is_dir() and int(p.name) not in complete)
        if skipped:
            logging.warning("skipping uncommitted checkpoint steps %s in %s (no commit_success.txt); latest "
                            "complete step: %s", skipped, self.directory, step)
        return None if step is None else self.restore(step, abstract_state)

    def _check_shapes(self, step: int, target):
        """Name every tensor whose saved shape or dtype differs from the target's."""
        saved = self._mgr.item_metadata(int(step)).state
        if saved is None:
            return
        flat_saved = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
        bad = []
        for path, t in jax.tree_util.tree_flatten_with_path(target)[0]:
            key = _name(path)
            m = flat_saved.pop(key, None)
            if m is None:
                bad.append(f"{key}: missing from the checkpoint")
            elif tuple(m.shape) != tuple(t.shape) or np.dtype(m.dtype) != np.dtype(t.dtype):
                bad.append(f"{key}: saved {m.dtype}{list(m.shape)}, expected {t.dtype}{list(t.shape)}")
        bad += [f"{key}: in the checkpoint but not in the model" for key in flat_saved]
        if bad:
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match the model:\n  "
                             + "\n  ".join(bad))

    def wait(self):
        self._mgr.wait_until_finished()

    def close(self):
        """Finish pending writes and release the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _name(path) -> str:
    """'opt_state.1.0.mu.embed.embedding': orbax's metadata tree uses plain dicts and lists, so paths
    are compared by their key names only."""
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return ".".join(str(p) for p in parts)


def _abstract(x):
    sharding = getattr(x, "sharding", None) or SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
