"""The tokenizer's chat template: messages -> prompt text, rendered the way transformers'
apply_chat_template renders it (jinja2's immutable sandbox, trim_blocks and lstrip_blocks,
loopcontrols, raise_exception, strftime_now, a tojson that keeps non-ASCII, the named special
tokens as variables) without importing transformers.

    template = ChatTemplate.from_artifacts(root)
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = template.encode(tokenizer, text)        # no second BOS: the template holds its own

The template is chat_template.jinja beside the tokenizer, else tokenizer_config.json's
"chat_template": a string, or a list of {"name", "template"} of which "default" is used.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from xcompile.errors import UserError
from xcompile.runtime.tokenizer import TextTokenizer, special_tokens

TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str] | None = None, where: str = ""):
        """source: the jinja template text; special: {"bos_token": "<s>", ...} for it to use."""
        import jinja2

        self.source, self.special, self.where = source, dict(special or {}), where
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"{where or 'chat template'}: not a valid template ({e})") from None

    @classmethod
    def from_artifacts(cls, root: str | Path) -> ChatTemplate:
        """The artifacts' (or a checkpoint's) chat template; a UserError when it has none."""
        root = Path(root)
        source, where = _find_template(root)
        if source is None:
            raise UserError(
                f"{root}: the model has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja); use --prompt with plain text"
            )
        return cls(source, special_tokens(root), where)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The conversation as the model's prompt text; add_generation_prompt appends the
        header of the assistant's turn. `extra` reaches the template as variables (tools,
        documents, enable_thinking, ... and overrides of the special tokens)."""
        import jinja2

        # as transformers: the template sees plain JSON data only, and keys whose value is
        # None are dropped (OpenAI clients send content=None beside tool_calls)
        messages = _plain(messages)
        check_messages(messages)
        messages = [
            _alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages
        ]
        variables = {"tools": None, "documents": None, **self.special}
        variables.update({k: _plain(v) for k, v in extra.items()})
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:  # raise_exception's message included
            message = " ".join(str(e).split())
            raise UserError(f"the chat template refused the messages: {message}") from None

    def encode(self, tokenizer: TextTokenizer, text: str) -> list[int]:
        """Token ids of rendered text: without the tokenizer's own special tokens, since the
        template already wrote the ones it wants (a BOS, typically) into the text; a second BOS
        is what transformers' apply_chat_template, vLLM and llama.cpp all avoid."""
        return tokenizer.encode(text, add_special_tokens=False)


def check_messages(messages: Any, where: str = "messages") -> None:
    """A UserError naming the first problem unless `messages` is a non-empty list of objects,
    each with a string "role" and a "content" (a string or a list of parts; null or missing
    only beside "tool_calls")."""
    if not isinstance(messages, list):
        raise UserError(
            f"{where}: expected a JSON list of messages like "
            f'[{{"role": "user", "content": "Hi"}}], got {type(messages).__name__}'
        )
    if not messages:
        raise UserError(f"{where}: the list of messages is empty; give at least one")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(
                f"{where}: message {i} is a {type(m).__name__}, not an object with "
                '"role" and "content"'
            )
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise UserError(f'{where}: message {i} has no "role" (a string such as "user")')
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
            raise UserError(
                f'{where}: message {i} ({m["role"]}) has no "content" string (or list of parts)'
            )


def read_messages(path: str | Path) -> list[dict]:
    """A --messages FILE.json: checked, with a one-line UserError for what is wrong."""
    path = Path(path)
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--messages {path}: no such file; give a JSON file of messages") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--messages {path}: cannot read ({e}); check the path") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"--messages {path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    check_messages(messages, f"--messages {path}")
    return messages


def _find_template(root: Path) -> tuple[str | None, str]:
    """(template text or None, where it came from). chat_template.jinja wins, as in
    transformers (which saves its template there since v4.5x)."""
    path = root / TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e}); rebuild the artifacts") from None
    path = root / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable or not JSON ({e}); rebuild the artifacts") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template, str(path)) if isinstance(template, str) and template else (None, "")


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    """A message's reasoning under every name templates read it by (as transformers: the
    first is the standard one, gpt-oss templates read "thinking")."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _environment():
    """transformers' chat template environment (utils/chat_template_utils.py), less the
    {% generation %} tag, which only marks assistant tokens for training masks: here it is
    parsed and its body rendered as is."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must not have
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """dict() and dict.fromkeys() without the rest of the type (no attribute escapes)."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names (no reaching CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """JSON-like data only (str, int, float, bool, None, dicts, lists, tuples): anything else
    becomes a "<TypeName>" placeholder, so the sandbox never sees an object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # a pydantic message (OpenAI's SDK)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
