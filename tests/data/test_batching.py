import itertools

import numpy as np
import pytest

from lmx.data.batching import batches, encode_example, make_batch, pack_examples, prompt_batch
from lmx.data.tasks import Arithmetic, Problem
from lmx.data.tokenizer import CharTokenizer

TOK = CharTokenizer()


def example(n_prompt: int, n_target: int, fill: int = 10):
    tokens = np.arange(fill, fill + n_prompt + n_target, dtype=np.int32)
    return tokens, np.r_[np.zeros(n_prompt), np.ones(n_target)].astype(np.float32)


def test_encode_example_layout():
    p = Problem("12+3=", "15", cot="2+3+0=05;1+0+0=01")
    tokens, mask = encode_example(TOK, p)
    assert TOK.decode(tokens) == "<bos>12+3=<think>2+3+0=05;1+0+0=01</think><answer>15</answer><eos>"
    n_prompt = 1 + len("12+3=")
    assert mask.tolist() == [0] * n_prompt + [1] * (len(tokens) - n_prompt)
    assert TOK.decode(encode_example(TOK, p, cot=False)[0], skip_special=True) == "12+3=15"


def test_make_batch_pads_right_and_masks():
    exs = [example(2, 3), example(4, 1)]
    b = make_batch(exs, seq_len=8, pad_id=0)
    assert b["tokens_BT"].dtype == np.int32 and b["loss_mask_BT"].dtype == np.float32
    assert b["tokens_BT"].tolist() == [[10, 11, 12, 13, 14, 0, 0, 0], [10, 11, 12, 13, 14, 0, 0, 0]]
    assert b["loss_mask_BT"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]
    assert b["lengths_B"].tolist() == [5, 5]
    assert b["segment_ids_BT"].tolist() == [[1] * 5 + [0] * 3] * 2
    assert b["positions_BT"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0]] * 2
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than seq_len=8"):
        make_batch([example(1, 1), example(4, 5)], seq_len=8)


def test_pack_examples_segments_and_positions():
    b = pack_examples([example(1, 2), example(2, 2, fill=50), example(3, 3), example(1, 1)], seq_len=8)
    assert b["tokens_BT"].tolist() == [[10, 11, 12, 50, 51, 52, 53, 0], [10, 11, 12, 13, 14, 15, 10, 11]]
    assert b["segment_ids_BT"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 2, 2]]
    assert b["positions_BT"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert b["loss_mask_BT"].tolist() == [[0, 1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 1]]
    assert b["lengths_B"].tolist() == [7, 8]
    with pytest.raises(ValueError, match="example 0 has 9 tokens"):
        pack_examples([example(4, 5)], seq_len=8)


def test_batches_are_deterministic_and_resumable():
    task = Arithmetic(num_digits=(1, 3), ops=("+", "-"))
    first = list(itertools.islice(batches(task, TOK, 4, 48, seed=7), 5))
    again = list(itertools.islice(batches(task, TOK, 4, 48, seed=7), 5))
    resumed = list(itertools.islice(batches(task, TOK, 4, 48, seed=7, start_step=3), 2))
    other = next(batches(task, TOK, 4, 48, seed=8))
    for a, b in zip(first, again, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(first[3:], resumed, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(first[0]["tokens_BT"], first[1]["tokens_BT"])
    assert not np.array_equal(first[0]["tokens_BT"], other["tokens_BT"])
    assert first[0]["tokens_BT"].shape == (4, 48)


def test_prompt_batch():
    ps = [Problem("1+2=", "3"), Problem("10+20=", "30")]
    assert prompt_batch(TOK, ps) == [[TOK.bos_id, *TOK.encode("1+2=")], [TOK.bos_id, *TOK.encode("10+20=")]]


def test_held_out_problems_avoid_every_training_stream():
    from lmx.data import get_task, held_out_problems

    task, tok = get_task("arithmetic", num_digits=(1, 2)), CharTokenizer()
    streams = [(32, 0, 20), (16, 5, 10)]
    problems, drawn = held_out_problems(task, streams, 50, seed=3)
    seen = set()
    for batch_size, seed, steps in streams:  # replay through the real batch iterator, decoding its prompts
        data = batches(task, tok, batch_size, 64, seed=seed)
        for _ in range(steps):
            b = next(data)
            for toks, mask in zip(b["tokens_BT"], b["loss_mask_BT"], strict=True):
                seen.add(tok.decode(toks[1:int(np.argmax(mask > 0))].tolist()))
    prompts = [p.prompt for p in problems]
    assert len(prompts) == 50 == len(set(prompts)) and not set(prompts) & seen
    assert drawn > 50  # 1-2 digit sums are a small space: many candidates were seen in training
