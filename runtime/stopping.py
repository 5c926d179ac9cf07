"""When generation stops, and the text it has made so far: EOS (and other stop token ids) and
stop strings, as vLLM and llama.cpp do them.

    checker = StopChecker(tokenizer, stop=["\\n\\n", "User:"], eos_ids=tokenizer.eos_ids)
    for token in tokens:
        text, finish_reason = checker.push(token)   # text: safe to show now
        ...
        if finish_reason: break                     # "stop": EOS or a stop string
    text = checker.flush()                          # at the end: what was held back

A stop string ends the text before it (the stop string itself is not shown). Streamed text never
shows part of a stop string: a tail that could still grow into one is held back until it either
does (dropped) or cannot any more (shown). A stop string that is exactly one special token
("<|im_end|>") stops on that token's id, since special tokens are not in the decoded text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from xcompile.errors import UserError
from xcompile.runtime.tokenizer import StreamDecoder, TextTokenizer


class StopChecker:
    """Feed generated token ids one at a time: push(token) -> (text to emit, finish_reason or
    None). After a stop, `stop_reason` is the stop string that matched (None for EOS, as vLLM's
    stop_reason) and `text` is all the text emitted."""

    def __init__(
        self, tokenizer: TextTokenizer, stop: Sequence[str] = (), eos_ids: Iterable[int] = ()
    ):
        for s in stop:
            if not isinstance(s, str) or not s:
                raise UserError(f"stop string {s!r}: give a non-empty string")
        self.stop_strings = list(dict.fromkeys(stop))
        self.stop_ids: dict[int, str | None] = dict.fromkeys(eos_ids)  # id -> its stop string
        for s in self.stop_strings:
            token_id = tokenizer.special_token_id(s)
            if token_id is not None:
                self.stop_ids[token_id] = s
        self.decoder = StreamDecoder(tokenizer)
        self.held = ""  # decoded, not yet emitted: it could still become a stop string
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None

    def push(self, token: int) -> tuple[str, str | None]:
        if self.finish_reason is not None:
            return "", self.finish_reason
        if token in self.stop_ids:  # its own text (if any) is not shown, as vLLM's stop ids
            text, reason = self._scan(self.held + self.decoder.flush(), final=True)
            if reason is None:
                self._emit("", "stop", self.stop_ids[token])
            return text, "stop"
        piece = self.decoder.push(token)
        if not piece:
            return "", None
        return self._scan(self.held + piece)

    def flush(self) -> str:
        """The held-back text, at the end of generation (for a finish by length). Safe to call
        after a stop: then it returns ""."""
        if self.finish_reason is not None:
            return ""
        text, _ = self._scan(self.held + self.decoder.flush(), final=True)
        return text

    def _scan(self, buffer: str, final: bool = False) -> tuple[str, str | None]:
        """Emit `buffer` up to the earliest stop string (then stop), else up to the tail that
        could still grow into one."""
        start, matched = len(buffer), None
        for s in self.stop_strings:
            i = buffer.find(s, 0, start + len(s) - 1)  # only a match that starts earlier
            if i != -1 and i < start:
                start, matched = i, s
        if matched is not None:
            return self._emit(buffer[:start], "stop", matched)
        keep = 0 if final else self._partial_tail(buffer)
        self.held = buffer[len(buffer) - keep :]
        return self._emit(buffer[: len(buffer) - keep], None, None)

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop_strings), default=1)
        for k in range(min(len(buffer), longest - 1), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0

    def _emit(self, text: str, finish_reason: str | None, stop_reason) -> tuple[str, str | None]:
        self.text += text
        if finish_reason is not None:
            self.held = ""
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
        return text, finish_reason
