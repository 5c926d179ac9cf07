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
        if family is None:
            raise UserError(
                f"{cfg}: architectures {archs} not supported; supported families: "
                f"{', '.join(sorted(known))}"
            )
        return cls(path, config, hashlib.sha256(raw).hexdigest(), family, _tensors(path))

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
            return AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(
                f"{self.path / 'config.json'}: transformers cannot read it "
                f"({str(e).splitlines()[0][:200]}); fix the config"
            ) from None


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
