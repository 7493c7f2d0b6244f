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
  vectors shares it): for comparison.
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

_M32 = 0xFFFFFFFF
_KEEP_BLOCK = 1 << 22  # coordinates tested at once when building a chunk's kept set (bounds memory)
_DENSE_TILE_ENTRIES = 1 << 16  # entries of a dense tile generated at once (small: the temporaries stay in cache)

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


@dataclass
class SparseProjector:
    """Seeded sparse random projection of a ``total_params``-long vector to ``proj_dim`` floats.

    ``cache`` keeps, per (offset, length, device) chunk, the kept local indices and their
    buckets/signs (sjlt: 8 bytes per kept coordinate) or column keys (dense), so that the hash
    runs once per chunk rather than once per prompt.
    """

    total_params: int
    keep_ratio: float
    proj_dim: int
    kind: str = "sjlt"
    seed: int = 0
    sjlt_nnz: int = 1
    cache: bool = True
    _layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def _layout(self, offset: int, numel: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(kept local indices or None when all are kept, sjlt codes or dense column keys)."""
        key = (offset, numel, str(device))
        if key in self._layouts:
            return self._layouts[key]
        local = self.kept_local_indices(offset, numel, device)
        glob = local + offset
        if self.kind == "sjlt":
            # Code = bucket + d * (sign < 0): one index_add_ into 2d slots, then a subtraction,
            # so neither the signs nor a multiply are needed at projection time.
            width, codes = self.proj_dim // self.sjlt_nnz, []
            for j in range(self.sjlt_nnz):
                bucket = coordinate_hash(glob, self.seed, _BUCKET + 2 * j) % width + j * width
                negative = coordinate_hash(glob, self.seed, _SIGN + 2 * j) & 1
                codes.append((bucket + negative * self.proj_dim).int())
            extra = torch.cat(codes)
        else:
            extra = coordinate_hash(glob, self.seed, _COLUMN)
        index_dtype = torch.int32 if numel < 2**31 else torch.long
        layout = (None if len(local) == numel else local.to(index_dtype), extra)
        if self.cache:
            self._layouts[key] = layout
        return layout

    # ---- projection -----------------------------------------------------------------------

    def project_chunk(self, flat: torch.Tensor, offset: int) -> torch.Tensor:
        """Project a slice of the global vector starting at ``offset``: [n] -> [d] (or [B, n] -> [B, d]).

        Returns float32 on ``flat``'s device. Summing over disjoint slices covering the whole
        vector gives the projection of the whole vector.
        """
        if flat.dim() not in (1, 2):
            raise ValueError(f"flat must be 1-D (or 2-D: a batch of slices), got shape {tuple(flat.shape)}")
        numel = flat.shape[-1]
        if offset < 0 or offset + numel > self.total_params:
            raise ValueError(f"slice [{offset}, {offset + numel}) outside [0, {self.total_params})")
        lead = flat.shape[:-1]
        if self.kind == "identity":
            out = torch.zeros(*lead, self.proj_dim, dtype=torch.float32, device=flat.device)
            out[..., offset : offset + numel] = flat
            return out
        if numel == 0:
            return torch.zeros(*lead, self.proj_dim, dtype=torch.float32, device=flat.device)
        local, extra = self._layout(offset, numel, flat.device)
        values = (flat if local is None else flat.index_select(-1, local)).float()
        if self.kind == "sjlt":
            return self._sjlt(values, extra)
        return self._dense(values, extra)

    def _sjlt(self, values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        d = self.proj_dim
        if self.sjlt_nnz > 1:
            values = values.repeat(*([1] * (values.dim() - 1)), self.sjlt_nnz)
        acc = torch.zeros(*values.shape[:-1], 2 * d, dtype=torch.float32, device=values.device)
        acc.index_add_(-1, codes, values)
        out = acc[..., :d] - acc[..., d:]
        return out if self.sjlt_nnz == 1 else out / math.sqrt(self.sjlt_nnz)

    def _entries_per_hash(self) -> int:
        # rademacher: 32 signs from the 32 bits of one hash; gaussian: a Box-Muller pair from
        # its two 16-bit halves (|z| <= 4.9, irrelevant for a sketch).
        return 32 if self.kind == "rademacher" else 2

    def _row_keys(self, device: torch.device) -> torch.Tensor:
        key = ("rows", str(device))
        if key not in self._layouts:
            n = -(-self.proj_dim // self._entries_per_hash())
            rows = torch.arange(n, dtype=torch.long, device=device)
            self._layouts[key] = coordinate_hash(rows, self.seed, _ROW)
        return self._layouts[key]

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

    def _dense(self, values: torch.Tensor, column_keys: torch.Tensor) -> torch.Tensor:
        d, rows = self.proj_dim, self._row_keys(values.device)
        out = torch.zeros(*values.shape[:-1], d, dtype=torch.float32, device=values.device)
        tile = max(1, _DENSE_TILE_ENTRIES // d)
        for start in range(0, values.shape[-1], tile):
            bits = mix32(rows[:, None] ^ column_keys[None, start : start + tile])
            out += values[..., start : start + tile] @ self._dense_tile(bits).T
        return out / math.sqrt(d)

    def project(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Project the concatenation of ``tensors`` (flattened, in order) without concatenating: [d] float32."""
        total = sum(t.numel() for t in tensors)
        if total != self.total_params:
            raise ValueError(f"tensors hold {total} coordinates, the projector expects {self.total_params}")
        out, offset = None, 0
        for t in tensors:
            part = self.project_chunk(t.reshape(-1), offset)
            out = part if out is None else out.add_(part.to(out.device))
            offset += t.numel()
        return out
