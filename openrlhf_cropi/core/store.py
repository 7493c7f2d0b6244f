"""On-disk rollout store: K responses per prompt with rewards and behavior log-probs, append-only.

Format (version 1) of a store directory S::

    S/meta.json          {"format": "cropi-rollouts", "version": 1, "meta": {...}}
                         ``meta`` records how the rollouts were made (model, temperature,
                         chat template, ...); written once, when the store is created.
    S/chunk-000000.pt    one chunk per append, numbered from 0 (gaps allowed), each a
    S/chunk-000001.pt    ``torch.save`` dict readable with ``torch.load(weights_only=True)``:
    ...

    "version"           1
    "index"             int64 [P]     prompt indices (position of the prompt in its source)
    "text"              list[str] P   prompt text exactly as fed to the model
    "label"             list[str] P   JSON encoding of each label
    "row"               list[str] P   JSON encoding of each original dataset row
    "prompt_offsets"    int64 [P+1]   prompt p's tokens: prompt_tokens[off[p]:off[p+1]]
    "prompt_tokens"     int32
    "num_responses"     int64 [P]     K of each prompt
    "response_offsets"  int64 [R+1]   R = sum K; response j's tokens likewise
    "response_tokens"   int32
    "behavior_logprobs" float32       one per response token, aligned with response_tokens
    "rewards"           float32 [R]

Responses are stored prompt after prompt, in order. Each chunk is written to a temporary name
in S and moved into place with ``os.replace`` (after fsync), so a chunk file is either complete
or absent: an interrupted write loses at most the chunk in flight, and leftover ``.tmp`` files
are ignored. A prompt index appears at most once in a store; ``indices()`` tells a resuming
writer what is already there. One writer at a time (there is no lock).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

FORMAT, VERSION = "cropi-rollouts", 1
_CHUNK = re.compile(r"^chunk-(\d+)\.pt$")


class StoreError(ValueError):
    """A malformed store or record (message names the file and what is wrong)."""


def _long(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def _float(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1)


@dataclass
class PromptRollouts:
    """One prompt with its K responses. Lists are converted to tensors; lengths are validated."""

    index: int
    text: str
    label: Any
    row: dict
    prompt_ids: torch.Tensor
    responses: list[torch.Tensor]
    rewards: torch.Tensor
    behavior_logprobs: list[torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        self.prompt_ids = _long(self.prompt_ids)
        self.responses = [_long(r) for r in self.responses]
        self.rewards = _float(self.rewards)
        self.behavior_logprobs = [_float(b) for b in self.behavior_logprobs]
        where = f"prompt {self.index}"
        if self.index < 0:
            raise StoreError(f"{where}: negative index")
        if len(self.prompt_ids) == 0:
            raise StoreError(f"{where}: empty prompt")
        k = len(self.responses)
        if k == 0:
            raise StoreError(f"{where}: no responses")
        if len(self.rewards) != k or len(self.behavior_logprobs) != k:
            raise StoreError(
                f"{where}: {k} responses, {len(self.rewards)} rewards, {len(self.behavior_logprobs)} log-prob rows"
            )
        for j, (r, b) in enumerate(zip(self.responses, self.behavior_logprobs)):
            if len(r) == 0:
                raise StoreError(f"{where}: response {j} is empty")
            if len(b) != len(r):
                raise StoreError(f"{where}: response {j} has {len(r)} tokens but {len(b)} behavior log-probs")
            if not torch.isfinite(b).all():
                raise StoreError(f"{where}: response {j} has non-finite behavior log-probs")
        if not torch.isfinite(self.rewards).all():
            raise StoreError(f"{where}: non-finite rewards")


def _encode(records: Sequence[PromptRollouts]) -> dict:
    responses = [r for rec in records for r in rec.responses]
    prompt_lens = [len(rec.prompt_ids) for rec in records]
    response_lens = [len(r) for r in responses]
    return {
        "version": VERSION,
        "index": _long([rec.index for rec in records]),
        "text": [rec.text for rec in records],
        "label": [json.dumps(rec.label) for rec in records],
        "row": [json.dumps(rec.row) for rec in records],
        "prompt_offsets": torch.tensor([0] + prompt_lens, dtype=torch.long).cumsum(0),
        "prompt_tokens": torch.cat([rec.prompt_ids for rec in records]).int(),
        "num_responses": _long([len(rec.responses) for rec in records]),
        "response_offsets": torch.tensor([0] + response_lens, dtype=torch.long).cumsum(0),
        "response_tokens": torch.cat(responses).int(),
        "behavior_logprobs": torch.cat([b for rec in records for b in rec.behavior_logprobs]),
        "rewards": torch.cat([rec.rewards for rec in records]),
    }


def _check_chunk(c: dict, path: Path) -> None:
    def bad(msg: str) -> StoreError:
        return StoreError(f"{path}: {msg}")

    keys = {"version", "index", "text", "label", "row", "prompt_offsets", "prompt_tokens", "num_responses",
            "response_offsets", "response_tokens", "behavior_logprobs", "rewards"}
    if not isinstance(c, dict) or set(c) != keys:
        raise bad(f"not a version-{VERSION} chunk (keys {sorted(c) if isinstance(c, dict) else type(c)})")
    if c["version"] != VERSION:
        raise bad(f"chunk version {c['version']}, this code reads {VERSION}")
    p = len(c["index"])
    if not (len(c["text"]) == len(c["label"]) == len(c["row"]) == len(c["num_responses"]) == p):
        raise bad("per-prompt fields have different lengths")
    po, ro = c["prompt_offsets"], c["response_offsets"]
    n_resp = int(c["num_responses"].sum())
    if len(po) != p + 1 or int(po[-1]) != len(c["prompt_tokens"]) or (po.diff() <= 0).any():
        raise bad("prompt offsets do not match prompt tokens")
    if len(ro) != n_resp + 1 or int(ro[-1]) != len(c["response_tokens"]) or (ro.diff() <= 0).any():
        raise bad("response offsets do not match response tokens")
    if len(c["rewards"]) != n_resp or len(c["behavior_logprobs"]) != len(c["response_tokens"]):
        raise bad("rewards or behavior log-probs do not match the responses")


class RolloutStore:
    """A rollout store directory (see the module docstring). ``create`` or ``open`` one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        try:
            header = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.path}: not a rollout store (no meta.json)") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path}: invalid JSON ({e})") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise StoreError(f"{meta_path}: not a {FORMAT} version-{VERSION} store")
        self.meta: dict = header["meta"]
        self._where: dict[int, tuple[Path, int]] = {}
        self._loaded: tuple[Path, dict] | None = None
        for chunk in self._chunk_paths():
            for row, i in enumerate(self._load(chunk)["index"].tolist()):
                if i in self._where:
                    raise StoreError(f"{chunk}: prompt {i} already stored in {self._where[i][0]}")
                self._where[i] = (chunk, row)

    @classmethod
    def create(cls, path: str | Path, meta: dict, exist_ok: bool = False) -> "RolloutStore":
        """Make a new store; with ``exist_ok`` reopen an existing one whose meta is identical."""
        path = Path(path)
        header = {"format": FORMAT, "version": VERSION, "meta": json.loads(json.dumps(meta))}
        if (path / "meta.json").exists():
            if not exist_ok:
                raise StoreError(f"{path}: store already exists")
            store = cls(path)
            if store.meta != header["meta"]:
                raise StoreError(f"{path}: existing store was made with {store.meta}, not {header['meta']}")
            return store
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / "meta.json", lambda f: f.write(json.dumps(header, indent=1).encode()))
        return cls(path)

    def _chunk_paths(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _CHUNK.match(p.name))]
        return [p for _, p in sorted(found)]

    def _load(self, chunk: Path) -> dict:
        if self._loaded is None or self._loaded[0] != chunk:
            try:
                c = torch.load(chunk, mmap=True, weights_only=True)
            except Exception as e:  # a truncated or foreign file: say which one
                raise StoreError(f"{chunk}: unreadable chunk ({e})") from None
            _check_chunk(c, chunk)
            self._loaded = (chunk, c)
        return self._loaded[1]

    def indices(self) -> list[int]:
        """Stored prompt indices, ascending."""
        return sorted(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, index: int) -> bool:
        return index in self._where

    def get(self, index: int) -> PromptRollouts:
        if index not in self._where:
            raise KeyError(f"{self.path}: prompt {index} not stored")
        chunk, row = self._where[index]
        return _decode_row(self._load(chunk), row)

    def __iter__(self) -> Iterator[PromptRollouts]:
        """All prompts, chunk by chunk (cheap: each chunk is loaded once)."""
        for chunk in self._chunk_paths():
            c = self._load(chunk)
            for row in range(len(c["index"])):
                yield _decode_row(c, row)

    def append(self, records: Sequence[PromptRollouts]) -> None:
        """Write ``records`` as one new chunk (atomically)."""
        if not records:
            return
        seen: set[int] = set()
        for rec in records:
            if rec.index in self._where or rec.index in seen:
                raise StoreError(f"{self.path}: prompt {rec.index} is already stored")
            seen.add(rec.index)
        paths = self._chunk_paths()
        number = int(_CHUNK.match(paths[-1].name).group(1)) + 1 if paths else 0
        chunk = self.path / f"chunk-{number:06d}.pt"
        data = _encode(records)
        _atomic_write(chunk, lambda f: torch.save(data, f))
        for row, rec in enumerate(records):
            self._where[rec.index] = (chunk, row)

    def writer(self, chunk_size: int) -> "ChunkWriter":
        return ChunkWriter(self, chunk_size)


def _decode_row(c: dict, row: int) -> PromptRollouts:
    po, ro = c["prompt_offsets"], c["response_offsets"]
    first = int(c["num_responses"][:row].sum())
    k = int(c["num_responses"][row])
    spans = [(int(ro[j]), int(ro[j + 1])) for j in range(first, first + k)]
    return PromptRollouts(
        index=int(c["index"][row]),
        text=c["text"][row],
        label=json.loads(c["label"][row]),
        row=json.loads(c["row"][row]),
        prompt_ids=c["prompt_tokens"][int(po[row]) : int(po[row + 1])].long(),
        responses=[c["response_tokens"][a:b].long() for a, b in spans],
        rewards=c["rewards"][first : first + k].clone(),
        behavior_logprobs=[c["behavior_logprobs"][a:b].clone() for a, b in spans],
    )


class ChunkWriter:
    """Buffers records and appends a chunk every ``chunk_size`` of them; the rest on close/exit."""

    def __init__(self, store: RolloutStore, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.store, self.chunk_size, self._buffer = store, chunk_size, []

    def add(self, record: PromptRollouts) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        self.store.append(buffer)

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        # Buffered records are complete prompts: keep them even when the loop was interrupted.
        self.flush()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
