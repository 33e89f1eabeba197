"""Hugging Face tokenizers (`tokenizer.json`) behind the same small interface as `CharTokenizer`.

Special ids come from the files beside `tokenizer.json`, first hit wins: `tokenizer_config.json`
(`bos_token`, ... as strings or {"content": ...}), `special_tokens_map.json`, then `config.json`
(`bos_token_id`, ...; a list of eos ids gives the first). Missing ones are None. `encode` never lets the
tokenizer's post-processor add specials: bos/eos are added only when asked, so there is never a double bos.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

_ROLES = ("bos", "eos", "pad")


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class HFTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def from_file(cls, path_or_dir) -> HFTokenizer:
        """From a `tokenizer.json` file or a directory holding one (plus optional config files)."""
        path = Path(path_or_dir)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        tok = Tokenizer.from_file(str(file))
        read = lambda f: json.loads(f.read_text()) if f.is_file() else {}
        tok_cfg = read(file.parent / "tokenizer_config.json")
        special_map = read(file.parent / "special_tokens_map.json")
        model_cfg = read(file.parent / "config.json")

        ids = {}
        for role in _ROLES:
            s = _token_str(tok_cfg.get(f"{role}_token")) or _token_str(special_map.get(f"{role}_token"))
            i = tok.token_to_id(s) if s is not None else None
            if s is not None and i is None:
                raise ValueError(f"{role}_token {s!r} (from {file.parent}) is not in the vocabulary")
            if i is None:
                i = model_cfg.get(f"{role}_token_id")
                i = i[0] if isinstance(i, list) and i else i
            ids[f"{role}_id"] = i
        return cls(tok, **ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        for flag, i, role in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
            if flag and i is None:
                raise ValueError(f"add_{role}=True but this tokenizer has no {role} token")
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; `skip_special` drops every special (added) token, bos/eos/pad included."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)
