"""Sparse random projection of gradients: keep a seeded subset of coordinates, then sketch to d.

The projection P maps the GLOBAL flattened parameter vector (all parameters, in a fixed order,
concatenated) to R^d. P is never built as a matrix and the gradient is never concatenated:
``project_chunk(flat, offset)`` projects any contiguous slice that starts at global coordinate
``offset``, and since P is linear the projection of the whole vector is the sum over the
slices. Slices can be whole parameters, parts of parameters or ZeRO-3 shards, in any order.

Everything random is a pure function of (seed, global coordinate index): a 32-bit integer hash
evaluated with int64 torch ops whose intermediate values stay below 2^49 (no overflow, no
sign-dependent shifts), so CPU and CUDA give the same bits for the same seed, whatever the
chunking. Gaussian entries come from those bits through Box-Muller (float32 log/cos), so
across devices they can differ by float rounding; the mask, buckets and signs are exact.

Coordinate i is kept iff hash(seed, "keep", i) < keep_ratio * 2^32. Kept coordinates are then
sketched by one of:

- ``sjlt``: sparse Johnson-Lindenstrauss (count sketch). d is split into ``sjlt_nnz`` blocks;
  in each block coordinate i is added with a random sign to one random bucket, scaled by
  1/sqrt(sjlt_nnz). One gather and one ``index_add_`` per chunk: a single pass over memory.
- ``gaussian`` / ``rademacher``: dense d x (kept) matrix with N(0,1) / +-1 entries, scaled by
  1/sqrt(d), generated tile by tile: one hash of (row-group key, coordinate key) gives 32
  Rademacher signs or one Box-Muller pair of Gaussians. Cost d x kept per call (a batch of
  vectors shares it): for comparison on small models; ``check_dense_cost`` rejects sizes
  where it would run for minutes per gradient.
- ``identity``: P = I (testing only): requires keep_ratio = 1 and proj_dim = total_params.

E <Px, Py> = <x_kept, y_kept> for the three random kinds; there is no 1/keep_ratio rescaling
because CROPI only uses cosines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, TypeVar

import torch

KINDS = ("sjlt", "gaussian", "rademacher", "identity")
LAYOUTS = ("auto", "index", "bitmask")

_M32 = 0xFFFFFFFF
_KEEP_BLOCK = 1 << 22  # coordinates tested at once when building a chunk's kept set (bounds memory)
_BLOCK = 1 << 24  # coordinates per cached layout block (a multiple of 8): bounds a projection's temporaries

# Dense projectors: the most matrix entries generated per projected vector, and the seconds
# per entry measured on the development CPU (AVX2, 2 cores; benchmarks/throughput.py).
DENSE_MAX_ENTRIES = 1 << 34
_DENSE_SECONDS_PER_ENTRY = {"rademacher": 3.5e-9, "gaussian": 1.15e-8}

# Hash streams: independent random functions of the coordinate index, one per use.
_KEEP, _COLUMN, _ROW = 1, 2, 3
_BUCKET, _SIGN = 16, 17  # + 2 * j for the j-th nonzero of the sjlt

Int = TypeVar("Int", int, torch.Tensor)


def _mul32(x: Int, c: int) -> Int:
    """(x * c) mod 2^32 for x in [0, 2^32): c split in 16-bit halves keeps products < 2^49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: Int) -> Int:
    """A bijective 32-bit integer finaliser (xorshift-multiply, good avalanche); ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys for (seed, stream): one mixed with the low, one with the high index word."""
    k = mix32(mix32((seed & _M32) ^ mix32(stream)) ^ (seed >> 32))
    return k, mix32(k ^ 0x5BD1E995)


def _hash_block(device: torch.device) -> int:
    # On CPU, ~20 elementwise ops per hash are fastest on cache-sized, single-threaded slices;
    # accelerators want few, large launches.
    return 1 << 14 if device.type == "cpu" else 1 << 24


def coordinate_hash(index: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Uniform 32-bit hash (int64 tensor) of global coordinate indices (int64, >= 0) for (seed, stream)."""
    k_lo, k_hi = _stream_keys(seed, stream)
    out = torch.empty_like(index)
    step = _hash_block(index.device)
    for start in range(0, index.numel(), step):
        part = index[start : start + step]
        low = mix32((part & _M32) ^ k_lo)
        high_words = part >> 32
        lo_hi, hi_hi = int(high_words.min()), int(high_words.max())
        # The high word is almost always one value per slice: mix it once, as a Python int.
        high = mix32(lo_hi ^ k_hi) if lo_hi == hi_hi else mix32(high_words ^ k_hi)
        out[start : start + step] = mix32(low ^ high)
    return out


@dataclass(frozen=True)
class _Block:
    """The cached layout of one block of coordinates (see ``SparseProjector.layout``)."""

    kept: torch.Tensor | None  # index: int32 local indices; bitmask: uint8, 1 bit per coordinate; None: all kept
    count: int  # kept coordinates
    codes: torch.Tensor  # sjlt: bucket + d * (sign < 0), sjlt_nnz per kept coordinate; dense: 32-bit column keys

    def nbytes(self) -> int:
        return self.codes.nbytes + (0 if self.kept is None else self.kept.nbytes)


def check_dense_cost(kind: str, total_params: int, keep_ratio: float, proj_dim: int) -> None:
    """Raise ValueError, naming the cost, when a dense projection of one gradient is too expensive.

    A dense projector generates proj_dim x (kept coordinates) matrix entries for every vector
    it projects (in the influence pass: every micro-batch's gradient). Above DENSE_MAX_ENTRIES
    a job would appear to hang; sjlt costs one pass over the gradient instead.
    """
    if kind not in ("gaussian", "rademacher"):
        return
    entries = proj_dim * keep_ratio * total_params
    if entries > DENSE_MAX_ENTRIES:
        seconds = entries * _DENSE_SECONDS_PER_ENTRY[kind]
        raise ValueError(
            f"a {kind} projection of {total_params:,} parameters generates proj_dim x kept coordinates = "
            f"{proj_dim} x {keep_ratio * total_params:,.0f} = {entries:.1e} matrix entries per gradient "
            f"(every micro-batch's), above the limit of {DENSE_MAX_ENTRIES:.1e}: about {seconds:,.0f} s each at the "
            f"development CPU's measured rate; sjlt costs one pass over the gradient"
        )


@dataclass
class SparseProjector:
    """Seeded sparse random projection of a ``total_params``-long vector to ``proj_dim`` floats.

    ``cache`` keeps the layout of every block of ``_BLOCK`` coordinates once built (the hash
    then runs once per block rather than once per call). ``layout`` is how a block's kept set
    is stored:

    - ``index``: int32 local indices (4 bytes per kept coordinate). Fastest on a CPU.
    - ``bitmask``: 1 bit per coordinate, expanded on the fly (``nonzero_static``, no host
      sync). Smaller at keep ratios above 1/32; meant for accelerators.
    - ``auto``: ``index`` on a CPU, ``bitmask`` elsewhere.

    plus, per kept coordinate, its sjlt codes (int32 with ``index``; int16 with ``bitmask``
    when 2 x proj_dim <= 65536) or its 32-bit dense column key. ``state_bytes_per_parameter``
    says what that comes to (sjlt, keep 0.1, d = 32768: 0.8 bytes per parameter with
    ``index``, 0.325 with ``bitmask``); ``state_bytes`` what is held.
    """

    total_params: int
    keep_ratio: float
    proj_dim: int
    kind: str = "sjlt"
    seed: int = 0
    sjlt_nnz: int = 1
    cache: bool = True
    layout: str = "auto"
    _blocks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.total_params < 1:
            raise ValueError(f"total_params must be >= 1, got {self.total_params}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if self.sjlt_nnz < 1 or self.proj_dim % self.sjlt_nnz:
            raise ValueError(f"sjlt_nnz must be >= 1 and divide proj_dim, got {self.sjlt_nnz} for {self.proj_dim}")
        if 2 * self.proj_dim >= 2**31:
            raise ValueError(f"proj_dim too large: {self.proj_dim}")
        if self.kind == "identity" and (self.keep_ratio != 1.0 or self.proj_dim != self.total_params):
            raise ValueError("the identity projector needs keep_ratio = 1 and proj_dim = total_params")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    # ---- the kept set ---------------------------------------------------------------------

    def _threshold(self) -> int:
        return math.ceil(self.keep_ratio * 2**32)

    def kept_local_indices(self, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Indices (relative to ``offset``, int64, ascending) of the kept coordinates of a chunk."""
        threshold, parts = self._threshold(), []
        for start in range(0, numel, _KEEP_BLOCK):
            local = torch.arange(start, min(numel, start + _KEEP_BLOCK), dtype=torch.long, device=device)
            parts.append(local[coordinate_hash(local + offset, self.seed, _KEEP) < threshold])
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    # ---- layouts --------------------------------------------------------------------------

    def _layout_on(self, device: torch.device) -> str:
        if self.layout != "auto":
            return self.layout
        return "index" if device.type == "cpu" else "bitmask"

    def _small_codes(self, layout: str) -> bool:
        # int16 sjlt codes (read back as unsigned) where they fit; with ``index`` the CPU
        # would pay a conversion per call to save memory it has.
        return layout == "bitmask" and self.kind == "sjlt" and 2 * self.proj_dim <= 2**16

    def state_bytes_per_parameter(self, device: torch.device | str) -> float:
        """Bytes of cached layout per parameter on ``device`` once every block has been projected."""
        if self.kind == "identity":
            return 0.0
        layout = self._layout_on(torch.device(device))
        code = 2 if self._small_codes(layout) else 4
        per_kept = code * (self.sjlt_nnz if self.kind == "sjlt" else 1)
        if self.keep_ratio < 1.0:
            per_kept += 4 if layout == "index" else 0
        bits = 1 / 8 if layout == "bitmask" and self.keep_ratio < 1.0 else 0.0
        return self.keep_ratio * per_kept + bits

    def state_bytes(self) -> int:
        """Bytes of layout held in the cache now (all devices)."""
        return sum(v.nbytes() if isinstance(v, _Block) else v.nbytes for v in self._blocks.values())

    def _block(self, offset: int, numel: int, device: torch.device, layout: str) -> _Block:
        key = (offset, numel, str(device), layout)
        if key in self._blocks:
            return self._blocks[key]
        local = self.kept_local_indices(offset, numel, device)
        glob = local + offset
        if self.kind == "sjlt":
            # Code = bucket + d * (sign < 0): one index_add_ into 2d slots, then a subtraction,
            # so neither the signs nor a multiply are needed at projection time.
            width, codes = self.proj_dim // self.sjlt_nnz, []
            for j in range(self.sjlt_nnz):
                bucket = coordinate_hash(glob, self.seed, _BUCKET + 2 * j) % width + j * width
                negative = coordinate_hash(glob, self.seed, _SIGN + 2 * j) & 1
                codes.append(bucket + negative * self.proj_dim)
            codes = torch.cat(codes)
            codes = _wrap(codes, 16).to(torch.int16) if self._small_codes(layout) else codes.int()
        else:
            codes = _wrap(coordinate_hash(glob, self.seed, _COLUMN), 32).int()
        if len(local) == numel:
            kept = None
        elif layout == "index":
            kept = local.int()
        else:
            mask = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8, device=device)
            mask[local] = 1
            kept = (mask.view(-1, 8) << _bit_shifts(device)).sum(-1, dtype=torch.uint8)
        block = _Block(kept, len(local), codes)
        if self.cache:
            self._blocks[key] = block
        return block

    def _kept_values(self, part: torch.Tensor, block: _Block, layout: str) -> torch.Tensor:
        if block.kept is None:
            return part
        if layout == "index":
            return part.index_select(-1, block.kept)
        mask = ((block.kept[:, None] >> _bit_shifts(part.device)) & 1).view(-1)[: part.shape[-1]]
        # nonzero_static: the size is known, so no device-to-host synchronisation.
        return part.index_select(-1, torch.nonzero_static(mask, size=block.count).squeeze(1))

    # ---- projection -----------------------------------------------------------------------

    def project_chunk(self, flat: torch.Tensor, offset: int) -> torch.Tensor:
        """Project a slice of the global vector starting at ``offset``: [n] -> [d] (or [B, n] -> [B, d]).

        Returns float32 on ``flat``'s device. Summing over disjoint slices covering the whole
        vector gives the projection of the whole vector.
        """
        acc = self.accumulator(flat.shape[:-1], flat.device)
        self.accumulate(acc, flat, offset)
        return self.finish(acc)

    def accumulator(self, lead: Sequence[int] = (), device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero accumulator ([*lead, 2d] for sjlt, else [*lead, d]) for ``accumulate``."""
        width = 2 * self.proj_dim if self.kind == "sjlt" else self.proj_dim
        return torch.zeros(*lead, width, dtype=torch.float32, device=device)

    def accumulate(self, acc: torch.Tensor, flat: torch.Tensor, offset: int) -> None:
        """Add the projection of a slice of the global vector starting at ``offset`` ([n] or
        [B, n], on ``acc``'s device) into ``acc``; ``finish(acc)`` then gives the projection of
        everything added. Temporaries are bounded by one block of ``_BLOCK`` coordinates,
        whatever the slice's size."""
        if flat.dim() not in (1, 2):
            raise ValueError(f"flat must be 1-D (or 2-D: a batch of slices), got shape {tuple(flat.shape)}")
        numel = flat.shape[-1]
        if offset < 0 or offset + numel > self.total_params:
            raise ValueError(f"slice [{offset}, {offset + numel}) outside [0, {self.total_params})")
        if self.kind == "identity":
            acc[..., offset : offset + numel] += flat
            return
        layout = self._layout_on(flat.device)
        for start in range(0, numel, _BLOCK):
            part = flat[..., start : start + _BLOCK]
            block = self._block(offset + start, part.shape[-1], flat.device, layout)
            values = self._kept_values(part, block, layout).float()
            if self.kind == "sjlt":
                codes = block.codes.int() & 0xFFFF if block.codes.dtype == torch.int16 else block.codes
                if self.sjlt_nnz > 1:
                    values = values.repeat(*([1] * (values.dim() - 1)), self.sjlt_nnz)
                acc.index_add_(-1, codes, values)
            else:
                self._dense_add(acc, values, block.codes.long() & _M32)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The projection ([..., d] float32) of what was accumulated in ``acc``."""
        d = self.proj_dim
        if self.kind == "sjlt":
            out = acc[..., :d] - acc[..., d:]
            return out if self.sjlt_nnz == 1 else out / math.sqrt(self.sjlt_nnz)
        return acc if self.kind == "identity" else acc / math.sqrt(d)

    def _entries_per_hash(self) -> int:
        # rademacher: 32 signs from the 32 bits of one hash; gaussian: a Box-Muller pair from
        # its two 16-bit halves (|z| <= 4.9, irrelevant for a sketch).
        return 32 if self.kind == "rademacher" else 2

    def _row_keys(self, device: torch.device) -> torch.Tensor:
        key = ("rows", str(device))
        if key not in self._blocks:
            n = -(-self.proj_dim // self._entries_per_hash())
            rows = torch.arange(n, dtype=torch.long, device=device)
            self._blocks[key] = coordinate_hash(rows, self.seed, _ROW)
        return self._blocks[key]

    def _dense_tile(self, bits: torch.Tensor) -> torch.Tensor:
        """Entries [d, tile] of the dense matrix from hashes [rows, tile] (float32)."""
        if self.kind == "rademacher":
            shifts = torch.arange(32, dtype=torch.long, device=bits.device)[None, :, None]
            signs = (bits[:, None, :] >> shifts) & 1  # [rows, 32, tile]
            entries = 1.0 - 2.0 * signs.reshape(-1, bits.shape[-1]).float()
        else:
            u1 = ((bits >> 16).float() + 0.5) / 65536.0
            angle = (bits & 0xFFFF).float() * (2.0 * math.pi / 65536.0)
            radius = torch.sqrt(-2.0 * torch.log(u1))
            entries = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
            entries = entries.reshape(-1, bits.shape[-1])
        return entries[: self.proj_dim]

    def _dense_add(self, out: torch.Tensor, values: torch.Tensor, column_keys: torch.Tensor) -> None:
        rows = self._row_keys(values.device)
        # Tiles of a few hundred columns on accelerators (GEMM-sized); cache-sized on a CPU.
        tile = max(1, (1 << 16 if values.device.type == "cpu" else 1 << 24) // self.proj_dim)
        for start in range(0, values.shape[-1], tile):
            bits = mix32(rows[:, None] ^ column_keys[None, start : start + tile])
            out += values[..., start : start + tile] @ self._dense_tile(bits).T

    def project(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Project the concatenation of ``tensors`` (flattened, in order) without concatenating: [d] float32."""
        total = sum(t.numel() for t in tensors)
        if total != self.total_params:
            raise ValueError(f"tensors hold {total} coordinates, the projector expects {self.total_params}")
        acc, offset = self.accumulator(device=tensors[0].device), 0
        for t in tensors:
            self.accumulate(acc, t.reshape(-1).to(acc.device), offset)
            offset += t.numel()
        return self.finish(acc)


def _wrap(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values (int64) as the signed integers of the same bits; `& mask` reads them back."""
    return torch.where(x >= 1 << (bits - 1), x - (1 << bits), x)


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)
