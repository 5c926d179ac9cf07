"""Parsers fuzzed: the manifest reader and the safetensors header reader under hypothesis. Whatever
the bytes, each either returns something that keeps its promises or raises UserError with one
line; no other exception escapes (a TypeError or ValueError here would be a traceback for the
user). Fast: 300 cases each; slow: 10,000 each.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import trials
from xcompile import artifacts
from xcompile.errors import UserError

# --- JSON of any shape, and names that try to leave the folder

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
path_names = st.one_of(
    st.sampled_from(
        [
            "rank0.safetensors",
            "link",
            "../x",
            "a/../../x",
            "/etc/hostname",
            "",
            ".",
            "..",
            "a\\..\\x",
            "a\x00b",
            "\ud800",
            "sub/",
            "//x",
            "./rank0.safetensors",
            "link/x",
            "x" * 300,
        ]
    ),
    st.text(max_size=16),
    st.lists(st.sampled_from(["..", ".", "a", "", "link", "\x00"]), max_size=5).map("/".join),
)


def _valid_manifest() -> dict:
    return {
        "format_version": 1,
        "family": "llama",
        "dtype": "fp32",
        "ranks": 1,
        "source": {"path": "/x", "config_sha256": "0" * 64},
        "passes": [],
        "files": {"rank0.safetensors": {"size": 8, "sha256": "0" * 64}},
        "quant": None,
        "config": {"layers": 1},
    }


@st.composite
def manifests(draw) -> bytes:
    """A manifest.json's bytes: a valid one bent in a few places, or anything at all."""
    shape = draw(st.sampled_from(["bent", "bent", "bent", "json", "bytes", "deep"]))
    if shape == "bytes":
        return draw(st.binary(max_size=200))
    if shape == "deep":
        depth = draw(st.integers(1, 200_000))
        return (b"[" * depth) + (b"]" * draw(st.integers(0, depth)))
    if shape == "json":
        return json.dumps(draw(json_values)).encode()
    data = _valid_manifest()
    keys = list(data) + ["signature", "format_version"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        action = draw(st.sampled_from(["set", "delete"]))
        if action == "delete":
            data.pop(key, None)
        else:
            data[key] = draw(json_values | st.integers(-3, 3))
    if draw(st.booleans()) and isinstance(data.get("files"), dict):
        entry = draw(
            st.fixed_dictionaries({"size": st.integers(-1, 10), "sha256": st.text(max_size=4)})
            | json_values
        )
        data["files"][draw(path_names)] = entry
    return json.dumps(data, allow_nan=True).encode()


def check_manifest(folder: Path, raw: bytes) -> str:
    (folder / "manifest.json").write_bytes(raw)
    try:
        m = artifacts.read_manifest(folder)
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return "refused"
    assert m.format_version == artifacts.FORMAT_VERSION
    assert type(m.ranks) is int and m.ranks >= 1
    inside = folder.resolve()
    for name, entry in m.files.items():
        assert type(entry["size"]) is int and isinstance(entry["sha256"], str)
        assert (folder / name).resolve().is_relative_to(inside), name
    return "parsed"


# --- safetensors files: a header bent in a few places, or anything at all

DTYPE_NAMES = [*artifacts.DTYPES, "F8", "", "f32", None, 4, ["F32"], {"F32": 1}]
FIELDS = {
    "dtype": st.sampled_from(DTYPE_NAMES) | json_values,
    "shape": st.lists(st.integers(-2, 2**41), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**65), max_size=3) | json_values,
}


@st.composite
def safetensors_files(draw) -> bytes:
    """A file's bytes: valid; with fields of its header bent (JSON still well-formed); with a
    bit flipped or cut short; or anything at all."""
    shape = draw(st.sampled_from(["valid", "bent", "bent", "bent", "damaged", "bytes"]))
    if shape == "bytes":
        return draw(st.binary(max_size=300))
    header: dict = {}
    offset = 0
    for i in range(draw(st.integers(0 if shape == "valid" else 1, 4))):
        dtype = draw(st.sampled_from(list(artifacts.DTYPES)))
        dims = draw(st.lists(st.integers(0, 4), max_size=3))
        count = 1
        for d in dims:
            count *= d
        nbytes = count * artifacts.DTYPES[dtype][0]
        header[f"t{i}"] = {"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data_size = offset
    if shape == "bent":
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from([*header, "__metadata__", "x"]))
            what = draw(st.sampled_from(["field", "field", "field", "entry", "drop"]))
            if what == "field" and isinstance(header.get(name), dict):
                field = draw(st.sampled_from(list(FIELDS)))
                header[name][field] = draw(FIELDS[field])
            elif what == "drop" and isinstance(header.get(name), dict):
                header[name].pop(draw(st.sampled_from(list(FIELDS))), None)
            else:
                header[name] = draw(json_values)
        data_size = draw(st.sampled_from([offset, offset + 1, max(0, offset - 1), 0]))
    raw = json.dumps(header, allow_nan=True).encode()
    raw += b" " * draw(st.integers(0, 7))
    length = len(raw)
    if shape == "bent" and draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, 2**64 - 1))
    blob = bytearray(struct.pack("<Q", length) + raw + bytes(data_size))
    if shape == "damaged" and blob:
        where = draw(st.integers(0, len(blob) - 1))
        if draw(st.booleans()):
            blob[where] ^= 1 << draw(st.integers(0, 7))
        else:
            del blob[where:]
    return bytes(blob)


def check_header(path: Path, raw: bytes) -> str:
    path.write_bytes(raw)
    try:
        tensors = artifacts.read_safetensors_header(path)
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return "refused"
    spans = sorted((t.begin, t.end) for t in tensors.values())
    (n,) = struct.unpack("<Q", raw[:8])
    cursor = 8 + n
    for begin, end in spans:  # back to back from the header's end to the file's end
        assert begin == cursor and end >= begin
        cursor = end
    assert cursor == len(raw)
    for t in tensors.values():
        count = 1
        for d in t.shape:
            count *= d
        assert t.nbytes == count * artifacts.DTYPES[t.dtype][0]
    return "parsed"


def _fuzz(strategy, check, target, n: int, ran: list) -> None:
    """Run check(target, example) on n examples; `ran` gets each one's outcome."""

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=n < 1000,  # the fast suite is the same every time
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def fuzz(raw):
        ran.append("failed")
        ran[-1] = check(target, raw)

    fuzz()


@trials(fast=300, slow=10_000)
@pytest.mark.parametrize("parser", ["manifest", "safetensors header"])
def test_parser_only_ever_refuses_cleanly(parser, n_trials, fault):
    record = fault(f"Parser fuzzed: {parser} reader")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "art"
        folder.mkdir()
        (folder / "rank0.safetensors").write_bytes(bytes(8))
        (folder / "link").symlink_to("/etc")  # a folder link out, for names through it
        if parser == "manifest":
            strategy, check, target = manifests(), check_manifest, folder
        else:
            strategy, check, target = safetensors_files(), check_header, folder / "f.safetensors"
        ran: list = []
        try:
            _fuzz(strategy, check, target, n_trials, ran)
        except Exception as e:  # hypothesis re-raises the shrunk failing case
            for _ in range(len(ran) - 1):
                record.trial(True)
            record.trial(False, why=f"{type(e).__name__}: {str(e)[:400]}")
            raise
    for _ in ran:
        record.trial(True)
    record.note = f"hypothesis: {ran.count('parsed'):,} parsed, {ran.count('refused'):,} refused"
    assert len(ran) >= n_trials, f"hypothesis ran {len(ran)} of {n_trials} cases"
    assert ran.count("parsed") and ran.count("refused"), "the cases must reach both outcomes"
    record.check()
