"""Artifacts loaded for running: manifest checked, weights mapped (no copy), plan built once.

model = Model.load("artifacts/")
cache = model.new_cache(capacity)
logits = model.forward(ids, start, cache)   # ids (S,) -> logits (S, vocab) fp32

Several sequences at once (the server's batch, beams): a cache with a slot each, then one
forward over all their new tokens (the weights are read once for all of them):
cache = model.new_cache(capacity, slots=4)
logits = model.forward_batch([Segment(slot, start, len(ids)), ...], all_ids, cache)  # (T, vocab)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xcompile import artifacts
from xcompile.errors import UserError
from xcompile.runtime.comm import Communicator, SingleRank
from xcompile.runtime.kv_cache import KVCache, Segment, cache_dtype
from xcompile.runtime.onnx_file import load_model
from xcompile.runtime.plan import Plan, build_plan


@dataclass
class Model:
    root: Path
    manifest: artifacts.Manifest
    graph: Any  # onnx.ModelProto (runtime/onnx_file.py)
    weights: dict[str, np.ndarray]
    use_kernels: bool = True
    comm: Communicator | None = None
    kv_dtype: np.dtype = np.dtype(np.float32)  # the KV cache's (kv_cache.cache_dtype)

    @classmethod
    def load(
        cls,
        root: str | Path,
        use_kernels: bool = True,
        rank: int = 0,
        comm: Communicator | None = None,
        weights: str = "copy",
        kv_cache: str = "auto",
    ) -> Model:
        """weights: "copy" into huge pages (faster decode) or "map" the file (no copy);
        kv_cache: the KV cache's dtype, auto | float32 | bfloat16 (kv_cache.cache_dtype)."""
        root = Path(root)
        manifest = artifacts.read_manifest(root)
        kv_dtype = cache_dtype(kv_cache, manifest.dtype)
        artifacts.verify(root, manifest)
        graph_file = root / (
            "model.onnx" if (root / "model.onnx").is_file() else f"rank{rank}.onnx"
        )
        try:
            graph = load_model(graph_file)
        except Exception as e:  # protobuf's DecodeError and friends
            raise UserError(
                f"{graph_file}: not a readable ONNX graph ({e.__class__.__name__}); "
                "rebuild the artifacts"
            ) from None
        shard = root / f"rank{rank}.safetensors"
        if weights == "copy":
            from xcompile.runtime.weights import resident

            mapped = resident(shard)
        elif weights == "map":
            mapped = dict(artifacts.map_tensors(shard))
        else:
            raise UserError(f"--weights {weights!r}: choose copy or map")
        if comm is not None and comm.ranks != manifest.ranks:
            raise UserError(
                f"{root} is sharded for {manifest.ranks} ranks, but {comm.ranks} "
                "are running; launch as many ranks as the manifest says"
            )
        return cls(root, manifest, graph, mapped, use_kernels, comm or SingleRank(), kv_dtype)

    @property
    def config(self) -> dict:
        return self.manifest.config or {}

    @property
    def context(self) -> int:
        return int(self.config["max_positions"])

    def new_cache(self, capacity: int, slots: int = 1) -> KVCache:
        c = self.config
        kv_heads = c["kv_heads"] // self.manifest.ranks  # this rank's share
        self._cache = KVCache(
            c["layers"], kv_heads, c["head_dim"], capacity, slots, dtype=self.kv_dtype
        )
        self._plan = build_plan(
            self.graph,
            self.weights,
            self._cache.buffers,
            self.use_kernels,
            comm=self.comm,
            kv=self._cache,
        )
        if slots > 1 and not self.batchable:
            raise UserError(
                f"{self.root} holds the primitive graph, which runs one sequence at a time; "
                "rebuild the artifacts with fusion (the default, without --no-fuse) for "
                "batching and beam search"
            )
        if os.environ.get("XCOMPILE_PROFILE"):
            self._plan.profile = {}
        return self._cache

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def batchable(self) -> bool:
        """The graph's attention is GroupQueryAttention, which reads the cache per sequence."""
        return any(n.op_type == "GroupQueryAttention" for n in self.graph.graph.node)

    def forward(
        self, ids: list[int], start: int, cache: KVCache, last_only: bool = False
    ) -> np.ndarray:
        """ids: the S new tokens at positions start..start+S-1 of slot 0 -> logits (S, vocab),
        or (1, vocab) for the last token only (last_only: what generating needs)."""
        rows = [len(ids) - 1] if last_only else None
        if not self.batchable:  # the primitive graph: past views in, KV appended behind them
            self._check(cache)
            s = len(ids)
            feeds = cache.past(start)
            feeds["input_ids"] = np.array([ids], dtype=np.int64)
            feeds["position_ids"] = np.arange(start, start + s, dtype=np.int64)[None]
            return self._run(feeds, rows)
        return self.forward_batch([Segment(0, start, len(ids))], ids, cache, rows)

    def forward_batch(
        self,
        segments: list[Segment],
        ids: list[int],
        cache: KVCache,
        rows: list[int] | None = None,
    ) -> np.ndarray:
        """The new tokens of several sequences in one pass: ids holds each segment's tokens in
        turn -> logits (len(ids), vocab), rows in the same order; or only `rows` of them
        (len(rows), vocab): the output projection then runs on those rows alone."""
        self._check(cache)
        if not self.batchable:
            raise UserError(
                f"{self.root} holds the primitive graph, which runs one sequence at a time "
                "(Model.forward); rebuild the artifacts with fusion for batching"
            )
        if sum(seg.length for seg in segments) != len(ids) or not ids:
            raise ValueError("forward_batch: the segments' lengths must add up to len(ids) > 0")
        cache.claim(segments)
        positions = [p for seg in segments for p in range(seg.start, seg.start + seg.length)]
        feeds = dict(cache.buffers)  # the attention steps write and read them through `rows`
        feeds["input_ids"], feeds["position_ids"] = self._id_feeds(ids, positions)
        cache.segments = segments
        # what fixes every shape and address of this forward: a replayed decode step needs
        # only the segments' start positions, which move by one a step
        key = (
            tuple((seg.slot, seg.length) for seg in segments),
            None if rows is None else tuple(rows),
        )
        try:
            return self._run(feeds, rows, key, [seg.start for seg in segments])
        finally:
            cache.segments = None

    def _id_feeds(self, ids: list[int], positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids, position_ids (1, n) int64 in blocks kept between forwards, so that their
        addresses stay put (a replayed step reads them where they were recorded)."""
        n = len(ids)
        block = getattr(self, "_ids_block", None)
        if block is None or block.shape[1] < n:
            block = self._ids_block = np.zeros((2, max(n, 64)), dtype=np.int64)
        block[0, :n] = ids
        block[1, :n] = positions
        return block[0, :n].reshape(1, n), block[1, :n].reshape(1, n)

    def fork(self, cache: KVCache, source: int, targets: list[int], length: int) -> None:
        cache.fork(source, targets, length)

    def reorder(self, cache: KVCache, parents: list[int], length: int) -> None:
        cache.reorder(parents, length)

    def _check(self, cache: KVCache) -> None:
        if cache is not self._cache:
            raise ValueError("forward() takes the cache from this model's new_cache()")

    def _run(
        self,
        feeds: dict[str, np.ndarray],
        rows: list[int] | None,
        key=None,
        starts: list[int] = (),
    ) -> np.ndarray:
        self._plan.rows = None if rows is None else np.array(rows, dtype=np.int64)
        try:
            # a copy: the plan reuses its output buffers at the next call
            return self._plan.run(feeds, key, starts)[0].copy()
        finally:
            self._plan.rows = None
