"""A Hugging Face checkpoint folder, read without loading weights: config.json, the safetensors
headers (one file or an index of shards) and the tokenizer files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from xcompile.artifacts import TensorInfo, read_safetensors_header
from xcompile.errors import UserError


@dataclass
class Checkpoint:
    path: Path
    config: dict
    config_sha256: str
    family: ModuleType
    tensors: dict[str, tuple[Path, TensorInfo]]  # name -> (file, where its bytes lie)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        from xcompile.frontend import families

        path = Path(path)
        if not path.is_dir():
            raise UserError(
                f"{path}: no such checkpoint folder; pass a Hugging Face model folder "
                "(config.json + *.safetensors)"
            )
        cfg = path / "config.json"
        try:
            raw = cfg.read_bytes()
            config = json.loads(raw)
        except FileNotFoundError:
            raise UserError(f"{path}: no config.json; pass a Hugging Face model folder") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(
                f"{cfg}: unreadable or not JSON ({e.__class__.__name__}); fix or re-download it"
            ) from None
        if not isinstance(config, dict):
            raise UserError(f"{cfg}: not a JSON object; fix or re-download it")
        known = families()
        archs = config.get("architectures") or []
        family = next((known[a] for a in archs if isinstance(a, str) and a in known), None)
        refused = {
            a: why for m in set(known.values()) for a, why in getattr(m, "REFUSED", {}).items()
        }
        for arch in archs:  # a family's own word on its architectures it does not compile
            if family is None and arch in refused:
                raise UserError(f"{cfg}: {arch} has {refused[arch]}")
        if family is None:
            raise UserError(
                f"{cfg}: architectures {archs} not supported; supported families: "
                f"{', '.join(sorted(known))}"
            )
        tensors = _tensors(path)
        views = getattr(family, "tensor_views", None)  # linears the checkpoint stores fused
        if views is not None:
            made = views(config, {name: info for name, (_, info) in tensors.items()})
            tensors.update({name: (tensors[src][0], info) for name, (src, info) in made.items()})
        return cls(path, config, hashlib.sha256(raw).hexdigest(), family, tensors)

    def require_tokenizer(self) -> None:
        if not (self.path / "tokenizer.json").is_file():
            raise UserError(
                f"{self.path}: no tokenizer.json; add the model's fast tokenizer file "
                "(transformers' tokenizer.save_pretrained writes it)"
            )

    def transformers_config(self):
        from xcompile.quiet import quiet_imports

        with quiet_imports():
            from transformers import AutoConfig

        try:
            with quiet_imports():  # its advice on how configs should spell rope settings
                return AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(
                f"{self.path / 'config.json'}: transformers cannot read it "
                f"({str(e).splitlines()[0][:200]}); fix the config"
            ) from None


def row_views(
    info: TensorInfo, names: list[str], rows: tuple[int, ...]
) -> dict[str, tuple[str, TensorInfo]]:
    """Consecutive row ranges of a row-major (N, K) tensor as tensors of their own: each a byte
    range of the same file, read like any other tensor (no copy, nothing loaded).
    -> view name -> (the tensor it lies in, where)."""
    if sum(rows) != info.shape[0] or len(info.shape) != 2:
        raise UserError(
            f"{info.name}: {tuple(info.shape)} does not split into rows {rows}; "
            "the config's head counts do not match the checkpoint"
        )
    row_bytes = info.nbytes // info.shape[0]
    views, begin = {}, info.begin
    for name, n in zip(names, rows):
        end = begin + n * row_bytes
        views[name] = (info.name, TensorInfo(name, info.dtype, (n, info.shape[1]), begin, end))
        begin += n * row_bytes
    return views


def _tensors(path: Path) -> dict[str, tuple[Path, TensorInfo]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{index}: malformed shard index; fix or re-download it") from None
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            (
                " (found pickle weights; convert them to safetensors, e.g. with transformers' "
                "save_pretrained)"
            )
            if other
            else ""
        )
        raise UserError(f"{path}: no *.safetensors weights{hint}")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: shard named in the index is missing; re-download it")
        for name, info in read_safetensors_header(f).items():
            tensors[name] = (f, info)
    return tensors
