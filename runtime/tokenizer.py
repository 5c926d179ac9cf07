"""The artifacts' tokenizer (tokenizers' fast tokenizer.json; transformers is not needed) and the
streaming detokenizer that prints text as tokens arrive without splitting a UTF-8 character."""

from __future__ import annotations

import json
from pathlib import Path

from xcompile.errors import UserError


class TextTokenizer:
    def __init__(self, root: str | Path):
        from tokenizers import Tokenizer

        root = Path(root)
        try:
            self.tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own Exception type
            raise UserError(
                f"{root / 'tokenizer.json'}: unreadable tokenizer ({e}); rebuild the artifacts"
            ) from None
        self.eos_ids = self._eos_ids(root)

    def _eos_ids(self, root: Path) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = root / name
            if path.is_file():
                try:
                    eos = json.loads(path.read_text()).get("eos_token_id")
                except (OSError, ValueError):
                    continue
                if isinstance(eos, int):
                    ids.add(eos)
                elif isinstance(eos, list):
                    ids.update(i for i in eos if isinstance(i, int))
                if ids:
                    break
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Feed token ids one at a time; get back the new text that is safe to print."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        new, self.printed = text[self.printed :], len(text)
        return new
