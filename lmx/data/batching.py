"""Token batches for training and prompts for generation.

An example is `bos + prompt + target + eos` (target = `format_target(problem)`). `loss_mask[t] = 1` marks
token t as a prediction target, so a trainer compares `logits_BTV[:, :-1]` with `tokens_BT[:, 1:]` under
`loss_mask_BT[:, 1:]`. Every batch dict carries the same keys whether or not it is packed:
  tokens_BT int32, loss_mask_BT float32, segment_ids_BT int32 (1.. per example, 0 = padding),
  positions_BT int32 (restart at 0 in each example, 0 on padding), lengths_B int32 (non-pad tokens per row).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lmx.data.tasks.base import Problem, Task, format_target
from lmx.data.tokenizer import CharTokenizer

Example = tuple[np.ndarray, np.ndarray]  # (tokens, loss_mask), both 1-D


def encode_example(tok: CharTokenizer, problem: Problem, cot: bool = True) -> Example:
    prompt = [tok.bos_id, *tok.encode(problem.prompt)]
    target = [*tok.encode(format_target(problem, cot=cot)), tok.eos_id]
    tokens = np.asarray(prompt + target, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(target), np.float32)])
    return tokens, mask


def _check_fits(tokens: np.ndarray, seq_len: int, index: int) -> None:
    if len(tokens) > seq_len:
        raise ValueError(f"example {index} has {len(tokens)} tokens, more than seq_len={seq_len}")


def _empty(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"tokens_BT": np.full((rows, seq_len), pad_id, np.int32),
            "loss_mask_BT": np.zeros((rows, seq_len), np.float32),
            "segment_ids_BT": np.zeros((rows, seq_len), np.int32),
            "positions_BT": np.zeros((rows, seq_len), np.int32),
            "lengths_B": np.zeros((rows,), np.int32)}


def _place(batch: dict[str, np.ndarray], row: int, start: int, segment: int, example: Example) -> int:
    tokens, mask = example
    end = start + len(tokens)
    batch["tokens_BT"][row, start:end] = tokens
    batch["loss_mask_BT"][row, start:end] = mask
    batch["segment_ids_BT"][row, start:end] = segment
    batch["positions_BT"][row, start:end] = np.arange(len(tokens))
    batch["lengths_B"][row] = end
    return end


def make_batch(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One example per row, right-padded to `seq_len`."""
    batch = _empty(len(examples), seq_len, pad_id)
    for i, ex in enumerate(examples):
        _check_fits(ex[0], seq_len, i)
        _place(batch, i, 0, 1, ex)
    return batch


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Several examples per row, in order: a row is closed when the next example does not fit.
    Attention must stay within a segment (segment_ids) and positions restart per segment."""
    rows: list[list[Example]] = [[]]
    used = 0
    for i, ex in enumerate(examples):
        _check_fits(ex[0], seq_len, i)
        if used + len(ex[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    batch = _empty(len(rows), seq_len, pad_id)
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            start = _place(batch, r, start, s + 1, ex)
    return batch


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The rng for one step of a stream: independent of every other step, so any step can be rebuilt."""
    return np.random.default_rng([seed, step])


def batches(task: Task, tok: CharTokenizer, batch_size: int, seq_len: int, seed: int, start_step: int = 0,
            cot: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Infinite stream of training batches; batch k depends only on (seed, k), so `start_step=k`
    resumes a run exactly where it stopped."""
    step = start_step
    while True:
        problems = task.sample(step_rng(seed, step), batch_size)
        yield make_batch([encode_example(tok, p, cot=cot) for p in problems], seq_len, tok.pad_id)
        step += 1


def prompt_batch(tok: CharTokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """bos + prompt token ids per problem, the input format of `lmx.decoding.generate`."""
    return [[tok.bos_id, *tok.encode(p.prompt)] for p in problems]


def held_out_problems(task: Task, streams: Sequence[tuple[int, int, int]], n: int, seed: int
                      ) -> tuple[list[Problem], int]:
    """`n` distinct problems whose prompts occur in none of the training `streams`, each given as
    (batch_size, seed, steps) of `batches`: batch k is `task.sample(step_rng(seed, k), batch_size)`, so the
    streams are replayed, not stored. Returns the problems and how many candidates were drawn."""
    seen = {p.prompt for batch_size, stream_seed, steps in streams for step in range(int(steps))
            for p in task.sample(step_rng(int(stream_seed), step), int(batch_size))}
    rng, out, drawn = np.random.default_rng([int(seed), 7]), [], 0
    while len(out) < n:
        for p in task.sample(rng, n - len(out)):
            drawn += 1
            if p.prompt not in seen:
                seen.add(p.prompt)  # no duplicates within the held-out set either
                out.append(p)
    return out, drawn
