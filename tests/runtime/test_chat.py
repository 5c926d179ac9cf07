"""Chat templates (runtime/chat.py) against transformers' own apply_chat_template on real-world
style templates, and `xrun --messages` / `--chat` end to end on the tiny compiled model (TP=2
included); bad inputs give one line and exit code 2."""

# ruff: noqa: E501  (the templates are written as their models ship them)

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_xrun
from xcompile.errors import UserError
from xcompile.runtime.chat import ChatTemplate
from xcompile.runtime.tokenizer import TextTokenizer

# Llama 3.1 style: BOS in the template, system message split off, strftime_now, | trim
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen 2.5 style ChatML: default system prompt, tools as tojson, tool calls and tool responses
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 2 / Mistral style with no whitespace control: only trim_blocks and lstrip_blocks keep
# the block lines out of the text; continue/break (loopcontrols), namespace, raise_exception,
# eos_token and a {% generation %} block (training templates mark the assistant's tokens)
INST = """{% set ns = namespace(turns=0) %}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
{% else %}
    {% set system = '' %}
{% endif %}
{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% set ns.turns = ns.turns + 1 %}
[INST] {% if system and ns.turns == 1 %}<<SYS>>{{ system }}<</SYS>> {% endif %}{{ message['content'] }} [/INST]
    {% elif message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}

    {% else %}
        {{ raise_exception('Only user, assistant and system roles are supported, not ' + message['role']) }}
    {% endif %}
    {% if ns.turns >= 3 %}
        {% break %}
    {% endif %}
{% endfor %}
"""

SYSTEM = {"role": "system", "content": "  You answer in one word. "}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system-user": [SYSTEM, {"role": "user", "content": "Name a colour."}],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Café au lait, 日本 ?"},
        {"role": "assistant", "content": "Délicieux"},
        {"role": "user", "content": 'And <b>tea</b> & "quotes"?'},
    ],
}
TOOL_CALL = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # as OpenAI clients send it; transformers drops the key
        "tool_calls": [
            {"function": {"name": "weather", "arguments": {"city": "Zürich", "unit": "°C"}}}
        ],
    },
    {"role": "tool", "content": "12 °C"},
    {"role": "tool", "content": "cloudy"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "str"}}}]


def tokenizer_folder(src: Path, dst: Path, where: str, template: str) -> Path:
    """The toy tokenizer's files with `template` in one of the places transformers reads:
    "config" (tokenizer_config.json's string), "named" (a list of named templates whose
    "default" is used) or "jinja" (chat_template.jinja)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    if where == "config":
        config["chat_template"] = template
    elif where == "named":
        config["chat_template"] = [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": template},
        ]
    elif where == "jinja":
        (dst / "chat_template.jinja").write_text(template)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def with_template(art: Path, dst: Path, where: str, template: str | None) -> Path:
    """A copy of artifacts whose chat template is replaced (or removed: template None), with
    the manifest's entries for the changed files brought up to date."""
    from xcompile.artifacts import MANIFEST, file_entry

    shutil.copytree(art, dst)
    tokenizer_folder(art, dst, where if template is not None else "none", template or "")
    manifest = json.loads((dst / MANIFEST).read_text())
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (dst / name).is_file():
            manifest["files"][name] = file_entry(dst / name)
        else:
            manifest["files"].pop(name, None)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
    from xcompile.toy import make_tokenizer

    folder = tmp_path_factory.mktemp("toy-tokenizer")
    make_tokenizer().save_pretrained(folder)
    return folder


CASES = [
    ("llama3", LLAMA3, "config"),
    ("chatml", CHATML, "jinja"),
    ("inst", INST, "named"),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen-prompt", "no-gen"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name,template,where", CASES, ids=[c[0] for c in CASES])
def test_render_and_tokens_equal_transformers(
    toy_tokenizer, tmp_path, name, template, where, conversation, add_generation_prompt
):
    from transformers import AutoTokenizer

    folder = tokenizer_folder(toy_tokenizer, tmp_path / name, where, template)
    messages = CONVERSATIONS[conversation]
    hf = AutoTokenizer.from_pretrained(folder)
    expected = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    expected_ids = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    chat = ChatTemplate.from_artifacts(folder)
    text = chat.render(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected
    ids = chat.encode(TextTokenizer(folder), text)
    assert ids == expected_ids

    # and the text is what the template says, not merely what both agree on
    last = messages[-1]["content"]
    assert last.strip() in text and ("one word" in text) == (messages[0] is SYSTEM)
    if name == "llama3":
        assert text.startswith("<s><|start_header_id|>system") and text.count("<s>") == 1
        assert ids[0] == hf.bos_token_id and ids.count(hf.bos_token_id) == 1  # one BOS only
        assert text.endswith("assistant<|end_header_id|>\n\n") == add_generation_prompt
    if name == "chatml":
        assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
        assert hf.bos_token_id not in ids  # the template has none, so none is added
    if name == "inst":
        assert "{%" not in text and "\n " not in text  # lstrip_blocks, trim_blocks
        assert text.count("[INST]") == sum(m["role"] == "user" for m in messages)


def test_tools_tool_calls_and_extra_variables_equal_transformers(toy_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    folder = tokenizer_folder(toy_tokenizer, tmp_path / "chatml", "jinja", CHATML)
    hf = AutoTokenizer.from_pretrained(folder)
    for tools in (None, TOOLS):
        expected = hf.apply_chat_template(
            TOOL_CALL, tools=tools, add_generation_prompt=True, tokenize=False
        )
        text = ChatTemplate.from_artifacts(folder).render(TOOL_CALL, tools=tools)
        assert text == expected
        assert '"arguments": {"city": "Zürich", "unit": "°C"}' in text  # tojson keeps non-ASCII
        assert text.count("<tool_response>") == 2 and text.count("<|im_start|>user") == 2
        assert ("# Tools" in text) == (tools is not None)


def test_where_the_template_comes_from(toy_tokenizer, tmp_path):
    """chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    folder = tokenizer_folder(toy_tokenizer, tmp_path / "both", "config", "from config")
    (folder / "chat_template.jinja").write_text("from file")
    assert ChatTemplate.from_artifacts(folder).render(CONVERSATIONS["user"]) == "from file"
    (folder / "chat_template.jinja").unlink()
    assert ChatTemplate.from_artifacts(folder).render(CONVERSATIONS["user"]) == "from config"


def test_template_errors_are_one_line(toy_tokenizer, tmp_path):
    with pytest.raises(UserError, match="no chat template.*--prompt"):
        ChatTemplate.from_artifacts(tokenizer_folder(toy_tokenizer, tmp_path / "no", "none", ""))
    with pytest.raises(UserError, match="roles are supported, not tool"):
        ChatTemplate(INST).render([{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="not a valid template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(UserError, match="refused"):  # the sandbox: no mutating the messages
        ChatTemplate("{{ messages.append(1) }}").render(CONVERSATIONS["user"])
    with pytest.raises(UserError, match="refused"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render(CONVERSATIONS["user"])
    with pytest.raises(UserError, match='no "role"'):
        ChatTemplate("x").render([{"content": "hi"}])


# ---------------------------------------------------------------------------------------------
# end to end: xrun --messages / --chat


def write_messages(folder: Path, messages) -> Path:
    path = folder / "messages.json"
    path.write_text(json.dumps(messages))
    return path


def test_messages_prompt_is_transformers_tokens(compiled, tmp_path):
    """xrun --messages on the toy template (no BOS in it): the prompt is exactly transformers'
    apply_chat_template ids, and the tokens are what generate() makes from them."""
    from transformers import AutoTokenizer

    from xcompile.runtime.generate import generate
    from xcompile.runtime.model import Model
    from xcompile.runtime.sampling import Sampler, SamplingParams

    art = compiled("llama")
    messages = CONVERSATIONS["multi-turn"]
    ids = AutoTokenizer.from_pretrained(art).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = run_xrun([str(art), "--messages", str(write_messages(tmp_path, messages)), "-n", "8"])
    expected = generate(Model.load(art), ids, 8, Sampler(SamplingParams()), {2})
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == expected.tokens and len(out["tokens"]) >= 1


def test_messages_equal_prompt_of_the_rendered_text(compiled, tmp_path):
    """With a template that writes its own BOS, --messages gives the tokens --prompt gives on the
    rendered text (whose BOS --prompt's tokenizer adds): one BOS, the same generation."""
    art = with_template(compiled("llama"), tmp_path / "art", "config", LLAMA3)
    messages = CONVERSATIONS["system-user"]
    text = ChatTemplate.from_artifacts(art).render(messages)
    assert text.startswith("<s>")
    chat = run_xrun([str(art), "--messages", str(write_messages(tmp_path, messages)), "-n", "8"])
    plain = run_xrun([str(art), "--prompt", text[len("<s>") :], "-n", "8"])
    assert (
        chat["prompt_tokens"]
        == plain["prompt_tokens"]
        == len(TextTokenizer(art).encode(text, add_special_tokens=False))
    )
    assert chat["tokens"] == plain["tokens"] and chat["text"] == plain["text"]
    assert chat["finish_reason"] == plain["finish_reason"]


def xrun_chat(art: Path, lines: str, *extra: str, launcher=None) -> subprocess.CompletedProcess:
    cmd = launcher or [sys.executable, "-m", "xcompile.runtime.cli"]
    return subprocess.run(
        [*cmd, str(art), "--chat", "-n", "6", *extra],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_chat_keeps_the_history_and_stops_at_exit(compiled, tmp_path):
    art = compiled("llama")
    res = xrun_chat(art, "Hello!\n\nHow are you?\n/exit\nnot read\n", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    turns = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(turns) == 2  # the empty line is skipped, nothing after /exit is read

    first = run_xrun(
        [str(art), "--messages", str(write_messages(tmp_path, CONVERSATIONS["user"])), "-n", "6"]
    )
    assert turns[0]["tokens"] == first["tokens"]
    history = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": turns[0]["text"]},
        {"role": "user", "content": "How are you?"},
    ]
    second = run_xrun([str(art), "--messages", str(write_messages(tmp_path, history)), "-n", "6"])
    assert turns[1]["prompt_tokens"] == second["prompt_tokens"] > turns[0]["prompt_tokens"]
    assert turns[1]["tokens"] == second["tokens"]

    streamed = xrun_chat(art, "Hello!\nHow are you?")  # EOF ends it too; no newline needed
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert streamed.stdout == turns[0]["text"] + "\n" + turns[1]["text"] + "\n"


def test_chat_goes_on_after_a_message_too_long_for_the_context(compiled, tmp_path):
    art = compiled("llama")
    too_long = " ".join(f"w{i}" for i in range(400))  # max_position_embeddings is 256
    res = xrun_chat(art, f"{too_long}\nHello!\n", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("xrun: error:")]
    assert len(errors) == 1 and "context is 256" in errors[0] and "/reset" in errors[0]
    (turn,) = [json.loads(line) for line in res.stdout.splitlines()]
    alone = run_xrun(
        [str(art), "--messages", str(write_messages(tmp_path, CONVERSATIONS["user"])), "-n", "6"]
    )
    assert turn["tokens"] == alone["tokens"]  # the refused message left no trace


def test_chat_under_tensor_parallel_gives_tp1_replies(compiled, sharded):
    lines = "Hello!\nHow are you?\n"
    one = xrun_chat(compiled("llama"), lines, "--json")
    two = xrun_chat(sharded("llama"), lines, "--json")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    one_turns = [json.loads(line) for line in one.stdout.splitlines()]
    two_turns = [json.loads(line) for line in two.stdout.splitlines()]
    assert [t["ranks"] for t in two_turns] == [2, 2]
    assert [t["tokens"] for t in two_turns] == [t["tokens"] for t in one_turns]
    assert len(one_turns) == 2


def test_messages_under_tensor_parallel_gives_tp1_tokens(compiled, sharded, tmp_path):
    path = str(write_messages(tmp_path, CONVERSATIONS["multi-turn"]))
    one = run_xrun([str(compiled("llama")), "--messages", path, "-n", "8"])
    two = run_xrun([str(sharded("llama")), "--messages", path, "-n", "8"])
    assert two["ranks"] == 2 and two["tokens"] == one["tokens"]


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit code 2


def xrun_error(cwd: Path, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "xcompile.runtime.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    "content,words",
    [
        (None, ["no such file"]),
        ('{"role": "user", "content": "hi"}', ["JSON list", "got dict"]),
        ("[]", ["empty"]),
        ("[{'role': 'user'}]", ["not JSON", "line 1"]),
        ('[{"content": "hi"}]', ['no "role"', "message 0"]),
        ('[{"role": "user", "content": "a"}, "hi"]', ["message 1", "not an object"]),
        ('[{"role": "user"}]', ['no "content"']),
    ],
    ids=["missing", "not-a-list", "empty", "not-json", "no-role", "not-an-object", "no-content"],
)
def test_bad_messages_file(compiled, tmp_path, content, words):
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    line = xrun_error(tmp_path, compiled("llama"), "--messages", path)
    assert "--messages" in line and str(path) in line, line
    for w in words:
        assert w in line, line


def test_no_chat_template(compiled, tmp_path):
    art = with_template(compiled("llama"), tmp_path / "art", "none", None)
    path = write_messages(tmp_path, CONVERSATIONS["user"])
    for args in (["--messages", path], ["--chat"]):
        line = xrun_error(tmp_path, art, *args)
        assert "no chat template" in line and "--prompt" in line, line


def test_template_refusing_the_messages(compiled, tmp_path):
    art = with_template(compiled("llama"), tmp_path / "art", "named", INST)
    path = write_messages(tmp_path, [{"role": "tool", "content": "x"}])
    line = xrun_error(tmp_path, art, "--messages", path)
    assert "roles are supported, not tool" in line, line


@pytest.mark.parametrize(
    "args,words",
    [
        ([], ["exactly one of --prompt", "--messages", "--chat"]),
        (["--prompt", "hi", "--chat"], ["exactly one of", "got 2"]),
        (["--prompt", "hi", "--stop", ""], ["--stop", "empty"]),
    ],
    ids=["none", "two", "empty-stop"],
)
def test_bad_source_flags(compiled, tmp_path, args, words):
    line = xrun_error(tmp_path, compiled("llama"), *args)
    for w in words:
        assert w in line, line
