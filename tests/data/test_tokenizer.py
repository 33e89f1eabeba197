import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmx.data.tokenizer import CHARS, DELIMITERS, CharTokenizer

TOK = CharTokenizer()
pieces = st.lists(st.one_of(st.sampled_from(CHARS), st.sampled_from(DELIMITERS)), max_size=60)


def test_fixed_ids_and_vocab():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
    ids = [TOK.think_id, TOK.end_think_id, TOK.answer_id, TOK.end_answer_id]
    assert TOK.encode("<think></think><answer></answer>") == ids
    assert len(set(ids) | {0, 1, 2}) == 7
    assert TOK.vocab_size % 8 == 0 and TOK.vocab_size >= 7 + len(CHARS)
    all_ids = TOK.encode(CHARS)
    assert len(set(all_ids)) == len(CHARS) and max(all_ids) < TOK.vocab_size


@given(pieces)
def test_round_trip(parts):
    text = "".join(parts)
    ids = TOK.encode(text)
    assert len(ids) == sum(1 if p in DELIMITERS else len(p) for p in parts)
    assert TOK.decode(ids) == text


def test_bos_eos_pad_and_skip_special():
    ids = TOK.encode("<think>1+1</think>", add_bos=True, add_eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert TOK.decode(ids + [TOK.pad_id] * 3) == "<bos><think>1+1</think><eos>"
    assert TOK.decode(ids, skip_special=True) == "1+1"
    assert TOK.encode("<thin>") == [TOK.encode(c)[0] for c in "<thin>"]  # not a delimiter


def test_errors_name_the_offender():
    with pytest.raises(ValueError, match="'é'"):
        TOK.encode("café")
    with pytest.raises(ValueError, match="token id 999"):
        TOK.decode([5, 999])
