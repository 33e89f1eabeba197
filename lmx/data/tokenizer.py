"""Character-level tokenizer: printable ASCII plus '\\n' and a few special tokens.

Small and fully deterministic, so tiny models trained on the procedural tasks need no vocabulary files.
Ids: 0 pad, 1 bos, 2 eos, 3 <think>, 4 </think>, 5 <answer>, 6 </answer>, 7 '\\n', then chr(32..126);
`vocab_size` is padded up to a multiple of 8 (padding ids are never produced by `encode`; `decode` renders
them as "").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIALS = (PAD, BOS, EOS, THINK, END_THINK, ANSWER, END_ANSWER)
DELIMITERS = (THINK, END_THINK, ANSWER, END_ANSWER)  # the specials that may appear inside text
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))

# Longest first so "</think>" is never read as "<" + ... ; only the delimiters split text.
_DELIM_RE = re.compile("(" + "|".join(re.escape(d) for d in sorted(DELIMITERS, key=len, reverse=True)) + ")")


class CharTokenizer:
    """Maps text to ids one character at a time; delimiter strings become single ids."""

    def __init__(self) -> None:
        self._id_of = {s: i for i, s in enumerate(SPECIALS)}
        self._id_of.update({c: len(SPECIALS) + i for i, c in enumerate(CHARS)})
        self._str_of = {i: s for s, i in self._id_of.items()}
        n = len(self._id_of)
        self._vocab_size = -(-n // 8) * 8

    pad_id = property(lambda self: 0)
    bos_id = property(lambda self: 1)
    eos_id = property(lambda self: 2)
    think_id = property(lambda self: 3)
    end_think_id = property(lambda self: 4)
    answer_id = property(lambda self: 5)
    end_answer_id = property(lambda self: 6)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(SPECIALS)))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for piece in _DELIM_RE.split(text):
            if piece in DELIMITERS:
                ids.append(self._id_of[piece])
                continue
            for ch in piece:
                i = self._id_of.get(ch)
                if i is None:
                    raise ValueError(f"CharTokenizer cannot encode character {ch!r} (U+{ord(ch):04X})")
                ids.append(i)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Inverse of `encode`. Pad ids are always dropped; bos/eos/delimiters are rendered as their
        strings unless `skip_special`. Decoding does not stop at eos (callers cut at their own lengths)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self._vocab_size})")
            if skip_special and i in self.special_ids:
                continue
            # Ids in the padding range have no string; an untrained model may still sample them.
            out.append(self._str_of.get(i, ""))
        return "".join(out)
