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
        self.special_tokens = special_tokens(root)
        self.eos_ids = self._eos_ids(root)

    def _eos_ids(self, root: Path) -> set[int]:
        """generation_config's eos ids (else config.json's), and the tokenizer's eos_token: vLLM
        stops on both (an instruct model's generation_config often lists its end-of-turn token,
        the tokenizer its end-of-text one)."""
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = root / name
            if path.is_file():
                try:
                    eos = json.loads(path.read_text()).get("eos_token_id")
                except (OSError, ValueError, AttributeError):
                    continue
                if isinstance(eos, int):
                    ids.add(eos)
                elif isinstance(eos, list):
                    ids.update(i for i in eos if isinstance(i, int))
                if ids:
                    break
        eos_token = self.special_tokens.get("eos_token")
        if eos_token is not None and self.tok.token_to_id(eos_token) is not None:
            ids.add(self.tok.token_to_id(eos_token))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False for text that already holds them, such as a rendered chat
        template (transformers' apply_chat_template tokenizes it that way)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def special_token_id(self, text: str) -> int | None:
        """The id of the special (added) token spelled exactly `text`, else None."""
        token_id = self.tok.token_to_id(text)
        if token_id is None:
            return None
        added = self.tok.get_added_tokens_decoder().get(token_id)
        return token_id if added is not None and added.special else None


def special_tokens(root: str | Path) -> dict[str, str]:
    """The named special tokens ({"bos_token": "<s>", "eos_token": "</s>", ...}) from
    tokenizer_config.json, else special_tokens_map.json: every `*_token` key whose value is a
    string or an AddedToken object ({"content": ...}), as transformers' special_tokens_map."""
    tokens: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        try:
            data = json.loads((Path(root) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key, value in data.items():
            if isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                tokens[key] = value
    return tokens


class StreamDecoder:
    """Feed token ids one at a time; get back the new text that is safe to print.

    Decodes only a short window (the tokens since the last piece, with the piece before them
    as context, as vLLM and TGI do), so a step costs the same at token 10 and token 10,000;
    the context keeps tokenizers whose decoding depends on the previous token (SentencePiece's
    leading space) right. The pieces joined, with flush(), equal decode(all tokens)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded into the last piece: context
        self.read = 0  # ids[read:] have not been printed

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for more bytes
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """What is left at the end (an incomplete UTF-8 sequence decodes to U+FFFD, as
        decode() would give it)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]
