"""On-disk rollout store: K responses per prompt with rewards, and behavior log-probs where needed.

Format (version 3) of a store directory S::

    S/meta.json            {"format": "cropi-rollouts", "version": 3, "meta": {...}}
                           ``meta`` records how the rollouts were made (model, temperatures,
                           chat template, ...); written once, when the store is created.
    S/chunk-000000.pt      rollouts: one chunk per ``append``, numbered from 0 (gaps allowed)
    S/behavior-000000.pt   behavior log-probs (log beta) of prompts stored in rollout chunks,
    ...                    one chunk per ``append_behavior``
    S/.lock                held (``fcntl.flock``) by the one process that writes the store

Every chunk is a ``torch.save`` dict readable with ``torch.load(weights_only=True)``. Rollout chunk::

    "version"           3
    "index"             int64 [P]     prompt indices (position of the prompt in its source)
    "text"              list[str] P   prompt text exactly as fed to the model
    "label"             list[str] P   JSON encoding of each label
    "row"               list[str] P   JSON encoding of each original dataset row
    "prompt_offsets"    int64 [P+1]   prompt p's tokens: prompt_tokens[off[p]:off[p+1]]
    "prompt_tokens"     int32
    "num_responses"     int64 [P]     K of each prompt
    "response_offsets"  int64 [R+1]   R = sum K; response j's tokens likewise
    "response_tokens"   int32
    "rewards"           float32 [R]   as the reward function returned them (no length penalty)
    "truncated"         bool [R]      the engine stopped the response at the length limit
                                      (finish_reason "length"; for OpenRLHF's stop-properly penalty)
    "sampling_logprobs" float32 [T]   optional, T = len(response_tokens): the engine's own
                                      log-probs of the sampled tokens (a check on log beta);
                                      present when every prompt of the chunk has them

Behavior chunk::

    "version"           3
    "index"             int64 [P]     prompts, each already in a rollout chunk
    "offsets"           int64 [P+1]   prompt p's log-probs: logprobs[off[p]:off[p+1]], one per
                                      response token, its responses in stored order
    "logprobs"          float32

A prompt without behavior log-probs was not teacher-forced; that absence is the marker. Writers
teacher-force only prompts that can be scored: never one with zero reward variance or a zero
gradient, and of a validation set only the seeded choice that is scored.

Version 2 stores (no truncation flags) are refused: make the rollouts again.

Responses are stored prompt after prompt, in order. Each chunk is written to a temporary name
in S, fsynced, and published under its final name with ``os.link``, which fails rather than
overwrite a chunk another writer published; then S itself is fsynced. A chunk file is either
complete or absent: an interrupted write loses at most the chunk in flight, and leftover
``.tmp`` files are ignored. A prompt appears at most once among the rollout chunks and at most
once among the behavior chunks. One writer at a time: ``RolloutStore.create`` takes the store's
lock (``flock``, so the kernel releases it when its holder dies) and a second writer stops at
once naming the holder; readers (``RolloutStore(path)``) take no lock.

``summary(objective)`` keeps what selection needs (rewards as training sees them and flags: a
few bytes per response), not tokens or log-probs, so its memory does not grow with
response length.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .advantages import Objective, first_copies, zero_gradient, zero_variance

FORMAT, VERSION = "cropi-rollouts", 3
_CHUNK = re.compile(r"^chunk-(\d+)\.pt$")
_BEHAVIOR = re.compile(r"^behavior-(\d+)\.pt$")
_ROLLOUT_KEYS = {"version", "index", "text", "label", "row", "prompt_offsets", "prompt_tokens", "num_responses",
                 "response_offsets", "response_tokens", "rewards", "truncated"}  # fmt: skip
_BEHAVIOR_KEYS = {"version", "index", "offsets", "logprobs"}
_SAMPLING = "sampling_logprobs"  # the one optional key (of rollout chunks)


class StoreError(ValueError):
    """A malformed store or record (message names the file and what is wrong)."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock (message names the store and the holder)."""


def _long(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def _float(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1)


@dataclass
class PromptRollouts:
    """One prompt with its K responses; ``truncated`` (None: none was) says which the engine
    stopped at the length limit; ``behavior_logprobs`` None where not teacher-forced,
    ``sampling_logprobs`` (what the engine reported for the tokens it sampled) None where not
    recorded. Lists are converted to tensors; lengths are validated."""

    index: int
    text: str
    label: Any
    row: dict
    prompt_ids: torch.Tensor
    responses: list[torch.Tensor]
    rewards: torch.Tensor
    behavior_logprobs: list[torch.Tensor] | None = field(default=None, repr=False)
    sampling_logprobs: list[torch.Tensor] | None = field(default=None, repr=False)
    truncated: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = _long(self.prompt_ids)
        self.responses = [_long(r) for r in self.responses]
        self.rewards = _float(self.rewards)
        k = len(self.responses)
        self.truncated = torch.zeros(k, dtype=torch.bool) if self.truncated is None else torch.as_tensor(
            self.truncated, dtype=torch.bool).reshape(-1)  # fmt: skip
        where = f"prompt {self.index}"
        if self.index < 0:
            raise StoreError(f"{where}: negative index")
        if len(self.prompt_ids) == 0:
            raise StoreError(f"{where}: empty prompt")
        if k == 0:
            raise StoreError(f"{where}: no responses")
        if len(self.rewards) != k or len(self.truncated) != k:
            raise StoreError(f"{where}: {k} responses, {len(self.rewards)} rewards, {len(self.truncated)} truncation flags")
        for j, r in enumerate(self.responses):
            if len(r) == 0:
                raise StoreError(f"{where}: response {j} is empty")
        if not torch.isfinite(self.rewards).all():
            raise StoreError(f"{where}: non-finite rewards")
        lengths = [len(r) for r in self.responses]
        if self.behavior_logprobs is not None:
            self.behavior_logprobs = _check_logprobs(self.index, lengths, self.behavior_logprobs)
        if self.sampling_logprobs is not None:
            self.sampling_logprobs = _check_logprobs(self.index, lengths, self.sampling_logprobs, "sampling")


def _check_logprobs(
    index: int, lengths: Sequence[int], behavior: Sequence[Any], what: str = "behavior"
) -> list[torch.Tensor]:
    where = f"prompt {index}"
    behavior = [_float(b) for b in behavior]
    if len(behavior) != len(lengths):
        raise StoreError(f"{where}: {len(lengths)} responses, {len(behavior)} {what} log-prob rows")
    for j, (n, b) in enumerate(zip(lengths, behavior)):
        if len(b) != n:
            raise StoreError(f"{where}: response {j} has {n} tokens but {len(b)} {what} log-probs")
    if not torch.isfinite(torch.cat(behavior)).all():
        bad = next(j for j, b in enumerate(behavior) if not torch.isfinite(b).all())
        raise StoreError(f"{where}: response {bad} has non-finite {what} log-probs")
    return behavior


@dataclass
class RolloutSummary:
    """What selection needs of a store, in ascending prompt index: no tokens, no log-probs.

    ``rewards`` are those training sees (the objective's length penalties applied), so zero
    variance, zero gradient, pass rates and every selector follow them. Memory: 18 bytes per
    prompt plus 4 per response (50 bytes per prompt at K = 8), whatever the response length.
    """

    index: torch.Tensor  # int64 [P]
    offsets: torch.Tensor  # int64 [P+1]: prompt p's responses are rows offsets[p]:offsets[p+1] below
    rewards: torch.Tensor  # float32 [R]
    zero_gradient: torch.Tensor  # bool [P]
    teacher_forced: torch.Tensor  # bool [P]

    def __len__(self) -> int:
        return len(self.index)

    def _per_prompt(self, reduce: str) -> torch.Tensor:
        owner = torch.repeat_interleave(torch.arange(len(self)), self.offsets.diff())
        out = torch.zeros(len(self), dtype=torch.float64)
        return out.scatter_reduce(0, owner, self.rewards.double(), reduce, include_self=False)

    @property
    def zero_variance(self) -> torch.Tensor:
        """bool [P]: all K rewards equal (or K < 2): no gradient in any phase."""
        single = self.offsets.diff() < 2
        return single | (self._per_prompt("amax") == self._per_prompt("amin"))

    @property
    def usable(self) -> torch.Tensor:
        """bool [P]: prompts that can have a score (reward variance and a gradient)."""
        return ~self.zero_variance & ~self.zero_gradient

    @property
    def pass_rate(self) -> torch.Tensor:
        """float64 [P]: mean reward (the behavior pass rate for 0/1 rewards)."""
        return self._per_prompt("mean")


def _encode(records: Sequence[PromptRollouts]) -> dict:
    responses = [r for rec in records for r in rec.responses]
    prompt_lens = [len(rec.prompt_ids) for rec in records]
    response_lens = [len(r) for r in responses]
    chunk = {
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
        "rewards": torch.cat([rec.rewards for rec in records]),
        "truncated": torch.cat([rec.truncated for rec in records]),
    }
    if all(rec.sampling_logprobs is not None for rec in records):
        chunk[_SAMPLING] = torch.cat([lp for rec in records for lp in rec.sampling_logprobs])
    return chunk


def _encode_behavior(behavior: Mapping[int, Sequence[torch.Tensor]]) -> dict:
    flat = [torch.cat(list(rows)) for rows in behavior.values()]
    return {
        "version": VERSION,
        "index": _long(list(behavior)),
        "offsets": torch.tensor([0] + [len(f) for f in flat], dtype=torch.long).cumsum(0),
        "logprobs": torch.cat(flat),
    }


def _check_chunk(c: Any, path: Path, keys: set) -> None:
    def bad(msg: str) -> StoreError:
        return StoreError(f"{path}: {msg}")

    if not isinstance(c, dict) or set(c) - {_SAMPLING} != keys or (_SAMPLING in c and keys is _BEHAVIOR_KEYS):
        raise bad(f"not a version-{VERSION} chunk (keys {sorted(c) if isinstance(c, dict) else type(c)})")
    if c["version"] != VERSION:
        raise bad(f"chunk version {c['version']}, this code reads {VERSION}")
    p = len(c["index"])
    if keys is _BEHAVIOR_KEYS:
        off = c["offsets"]
        if len(off) != p + 1 or int(off[-1]) != len(c["logprobs"]) or (off.diff() <= 0).any():
            raise bad("offsets do not match the log-probs")
        return
    if not (len(c["text"]) == len(c["label"]) == len(c["row"]) == len(c["num_responses"]) == p):
        raise bad("per-prompt fields have different lengths")
    po, ro = c["prompt_offsets"], c["response_offsets"]
    n_resp = int(c["num_responses"].sum())
    if len(po) != p + 1 or int(po[-1]) != len(c["prompt_tokens"]) or (po.diff() <= 0).any():
        raise bad("prompt offsets do not match prompt tokens")
    if len(ro) != n_resp + 1 or int(ro[-1]) != len(c["response_tokens"]) or (ro.diff() <= 0).any():
        raise bad("response offsets do not match response tokens")
    if len(c["rewards"]) != n_resp or len(c["truncated"]) != n_resp:
        raise bad("rewards or truncation flags do not match the responses")
    if _SAMPLING in c and len(c[_SAMPLING]) != len(c["response_tokens"]):
        raise bad("sampling log-probs do not match the response tokens")


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
            raise StoreError(
                f"{meta_path}: not a {FORMAT} version-{VERSION} store (found {header.get('format')} "
                f"version {header.get('version')}: make the rollouts again with this version)"
            )
        self.meta: dict = header["meta"]
        self._where: dict[int, tuple[Path, int]] = {}
        self._behavior: dict[int, tuple[Path, int]] = {}
        self._loaded: dict[Path, dict] = {}  # the last rollout chunk and the last behavior chunk read
        self._lock: _WriterLock | None = None  # held by stores made with ``create``: the one writer
        for chunk in self._paths(_CHUNK):
            self._register(chunk, self._where, "stored")
        for chunk in self._paths(_BEHAVIOR):
            self._register(chunk, self._behavior, "teacher-forced")
            for i in self._load(chunk)["index"].tolist():
                if i not in self._where:
                    raise StoreError(f"{chunk}: log-probs of prompt {i}, which has no rollouts")

    def _register(self, chunk: Path, where: dict, what: str) -> None:
        for row, i in enumerate(self._load(chunk)["index"].tolist()):
            if i in where:
                raise StoreError(f"{chunk}: prompt {i} already {what} in {where[i][0]}")
            where[i] = (chunk, row)

    @classmethod
    def create(cls, path: str | Path, meta: dict, exist_ok: bool = False) -> "RolloutStore":
        """Make a new store and hold its writer's lock; with ``exist_ok`` reopen an existing one
        whose meta is identical. The lock is held until ``close()`` or the end of the process."""
        path = Path(path)
        header = {"format": FORMAT, "version": VERSION, "meta": json.loads(json.dumps(meta))}
        if (path / "meta.json").exists() and not exist_ok:
            raise StoreError(f"{path}: store already exists")
        if (path / "meta.json").exists():
            made = cls(path).meta
            if made != header["meta"]:
                diff = sorted(set(made) | set(header["meta"]))
                diff = [f"{k}={made.get(k)!r} (now {header['meta'].get(k)!r})" for k in diff
                        if made.get(k) != header["meta"].get(k)]  # fmt: skip
                raise StoreError(f"{path}: existing store was made with {', '.join(diff)}")
        lock = _WriterLock(path)
        if not (path / "meta.json").exists():
            _publish(path / "meta.json", lambda f: f.write(json.dumps(header, indent=1).encode()))
        store = cls(path)  # listed under the lock: what the previous writer left
        store._lock = lock
        return store

    def _paths(self, pattern: re.Pattern) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def _load(self, chunk: Path) -> dict:
        if chunk not in self._loaded:
            try:
                c = torch.load(chunk, mmap=True, weights_only=True)
            except Exception as e:  # a truncated or foreign file: say which one
                raise StoreError(f"{chunk}: unreadable chunk ({e})") from None
            keys = _BEHAVIOR_KEYS if _BEHAVIOR.match(chunk.name) else _ROLLOUT_KEYS
            _check_chunk(c, chunk, keys)
            # Keep one chunk of each kind mapped: reading a store chunk after chunk stays flat in memory.
            for other in [p for p in self._loaded if (_BEHAVIOR.match(p.name) is None) == (keys is _ROLLOUT_KEYS)]:
                del self._loaded[other]
            self._loaded[chunk] = c
        return self._loaded[chunk]

    def indices(self) -> list[int]:
        """Stored prompt indices, ascending."""
        return sorted(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, index: int) -> bool:
        return index in self._where

    def teacher_forced(self, index: int) -> bool:
        return index in self._behavior

    def chunks_of(self, index: int) -> list[str]:
        """The file names that hold a stored prompt: its rollout chunk, and its behavior chunk if any."""
        return [where[index][0].name for where in (self._where, self._behavior) if index in where]

    def get(self, index: int) -> PromptRollouts:
        if index not in self._where:
            raise KeyError(f"{self.path}: prompt {index} not stored")
        chunk, row = self._where[index]
        rec = _decode_row(self._load(chunk), row)
        if index in self._behavior:
            bchunk, brow = self._behavior[index]
            b = self._load(bchunk)
            flat = b["logprobs"][int(b["offsets"][brow]) : int(b["offsets"][brow + 1])]
            rec.behavior_logprobs = [part.clone() for part in flat.split([len(r) for r in rec.responses])]
        return rec

    def __iter__(self) -> Iterator[PromptRollouts]:
        """All prompts in chunk order."""
        for chunk in self._paths(_CHUNK):
            for i in self._load(chunk)["index"].tolist():
                yield self.get(i)

    def summary(self, objective: Objective = Objective()) -> RolloutSummary:
        """Rewards as ``objective`` trains on them, lengths and flags of every stored prompt,
        ascending index (see RolloutSummary). Reads each chunk's tokens once, for the copies."""
        parts = []
        for chunk in self._paths(_CHUNK):
            c = self._load(chunk)
            rewards, zero_grad = _shaped(c, objective)
            parts.append((c["index"].clone(), c["num_responses"].clone(), rewards, zero_grad))
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return RolloutSummary(empty, torch.zeros(1, dtype=torch.long), empty.float(), empty.bool(), empty.bool())
        index, counts, rewards, zero_grad = (torch.cat(x) for x in zip(*parts))
        order = torch.argsort(index)
        starts = (torch.cumsum(counts, 0) - counts)[order]
        counts = counts[order]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        # Row r of the sorted layout comes from its prompt's old start plus its rank within the prompt.
        rows = torch.repeat_interleave(starts - offsets[:-1], counts) + torch.arange(int(offsets[-1]))
        index = index[order]
        forced = torch.tensor([i in self._behavior for i in index.tolist()], dtype=torch.bool)
        return RolloutSummary(index, offsets, rewards[rows], zero_grad[order], forced)

    def prompts(self) -> Iterator[tuple[int, str, Any]]:
        """(index, prompt text, label) of every stored prompt, in chunk order, without decoding tokens."""
        for chunk in self._paths(_CHUNK):
            c = self._load(chunk)
            for i, text, label in zip(c["index"].tolist(), c["text"], c["label"]):
                yield i, text, json.loads(label)

    def append(self, records: Sequence[PromptRollouts]) -> None:
        """Write ``records`` as one new rollout chunk (atomically), and the behavior log-probs
        they carry as one behavior chunk."""
        if not records:
            return
        self._check_writer()
        seen: set[int] = set()
        for rec in records:
            if rec.index in self._where or rec.index in seen:
                raise StoreError(f"{self.path}: prompt {rec.index} is already stored")
            seen.add(rec.index)
        chunk = self._next(_CHUNK, "chunk")
        data = _encode(records)
        _publish(chunk, lambda f: torch.save(data, f))
        for row, rec in enumerate(records):
            self._where[rec.index] = (chunk, row)
        self._write_behavior({rec.index: rec.behavior_logprobs for rec in records if rec.behavior_logprobs is not None})

    def append_behavior(self, behavior: Mapping[int, Sequence[torch.Tensor]]) -> None:
        """Write the behavior log-probs of stored prompts (index -> one tensor per response) as one chunk."""
        if not behavior:
            return
        self._check_writer()
        checked = {}
        for i, rows in behavior.items():
            if i not in self._where:
                raise StoreError(f"{self.path}: prompt {i} has no rollouts to add log-probs to")
            if i in self._behavior:
                raise StoreError(f"{self.path}: prompt {i} is already teacher-forced")
            chunk, row = self._where[i]
            checked[i] = _check_logprobs(i, _response_spans(self._load(chunk), row).diff().tolist(), rows)
        self._write_behavior(checked)

    def _write_behavior(self, checked: Mapping[int, list[torch.Tensor]]) -> None:
        if not checked:
            return
        path = self._next(_BEHAVIOR, "behavior")
        data = _encode_behavior(checked)
        _publish(path, lambda f: torch.save(data, f))
        for row, i in enumerate(checked):
            self._behavior[i] = (path, row)

    def close(self) -> None:
        """Release the writer's lock (a reader has none); the store stays readable."""
        if self._lock is not None:
            self._lock.file.close()
            self._lock = None

    def _check_writer(self) -> None:
        if self._lock is None:
            raise StoreError(f"{self.path}: opened for reading; RolloutStore.create opens a store for writing")

    def _next(self, pattern: re.Pattern, stem: str) -> Path:
        paths = self._paths(pattern)
        number = int(pattern.match(paths[-1].name).group(1)) + 1 if paths else 0
        return self.path / f"{stem}-{number:06d}.pt"

    def writer(self, chunk_size: int) -> "ChunkWriter":
        return ChunkWriter(self, chunk_size)


def _response_spans(c: dict, row: int) -> torch.Tensor:
    """Offsets [K+1] of the responses of a chunk's row in its response_tokens."""
    first = int(c["num_responses"][:row].sum())
    return c["response_offsets"][first : first + int(c["num_responses"][row]) + 1]


def _shaped(c: dict, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """A rollout chunk's rewards as ``objective`` trains on them (float32 [R]) and each prompt's
    zero-gradient flag (bool [P]) under them."""
    offsets, tokens = c["response_offsets"].tolist(), c["response_tokens"]
    lengths, rewards, flags, r = c["response_offsets"].diff().tolist(), [], [], 0
    for k in c["num_responses"].tolist():
        rows = slice(r, r + k)
        shaped = objective.rewards(c["rewards"][rows], lengths[rows], c["truncated"][rows].tolist())
        rewards.append(shaped)
        if k < 2 or bool(zero_variance(shaped)):
            flags.append(False)
        else:
            first = first_copies([tokens[offsets[j] : offsets[j + 1]] for j in range(r, r + k)])
            # float64 weights: a true cancellation of copies then leaves ~1e-16, not float32's ~1e-8
            flags.append(zero_gradient(first, objective.weights(c["rewards"][rows].double(), lengths[rows],
                                                                c["truncated"][rows].tolist())))  # fmt: skip
        r += k
    return (torch.cat(rewards) if rewards else torch.zeros(0)), torch.tensor(flags, dtype=torch.bool)


def _decode_row(c: dict, row: int) -> PromptRollouts:
    po = c["prompt_offsets"]
    first = int(c["num_responses"][:row].sum())
    k = int(c["num_responses"][row])
    bounds = _response_spans(c, row).tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    sampling = [c[_SAMPLING][a:b].clone() for a, b in spans] if _SAMPLING in c else None
    return PromptRollouts(
        index=int(c["index"][row]),
        text=c["text"][row],
        label=json.loads(c["label"][row]),
        row=json.loads(c["row"][row]),
        prompt_ids=c["prompt_tokens"][int(po[row]) : int(po[row + 1])].long(),
        responses=[c["response_tokens"][a:b].long() for a, b in spans],
        rewards=c["rewards"][first : first + k].clone(),
        truncated=c["truncated"][first : first + k].clone(),
        sampling_logprobs=sampling,
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


def reward_source(url: str) -> dict:
    """A reward function as a store's meta records it: a local file by path and content, else its URL."""
    if os.path.isfile(url):
        return {"path": os.path.abspath(url), "sha256": hashlib.sha256(Path(url).read_bytes()).hexdigest()}
    return {"url": url}


class _WriterLock:
    """An exclusive ``flock`` on S/.lock, taken at once or not at all. The kernel releases it when
    the holder's file closes or its process dies, so a crashed job leaves no stale lock. The file
    names the holder for the error a second writer gets."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.file = open(path / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that has not written its name yet"
            self.file.close()
            raise StoreBusyError(
                f"{path}: another process is writing this store ({holder}). One writer per store: wait for it "
                "to end or stop it (a Slurm requeue while the old job still runs?), or give this job another "
                "--cropi.store_dir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()


def _publish(path: Path, write) -> None:
    """Write a file under a temporary name, fsync it, link it to ``path`` (never over an existing
    file: a second writer fails here instead of replacing a chunk), then fsync the directory so
    the new name survives a crash."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise StoreError(f"{path} already exists: another process wrote to this store") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
