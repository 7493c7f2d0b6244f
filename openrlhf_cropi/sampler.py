"""The prompt sampler that trains each phase on its selected subset of the pool.

OpenRLHF draws prompts from one `StatefulDataLoader` iterator for the whole run. This sampler
yields, on every draw, the next index of the CURRENT subset (reshuffled on each pass through
it), so swapping the subset at a phase boundary takes effect at the next draw. Its state is a
few integers and the subset: `state_dict()` lands in OpenRLHF's checkpoint through the
dataloader (`data_loader_state_dict`), and the shuffle order is re-derived from
(seed, phase, pass), so a resumed run draws exactly the prompts the original would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class PhaseSampler(Sampler[int]):
    def __init__(self, total_draws: int, seed: int):
        if total_draws < 1:
            raise ValueError(f"total_draws must be >= 1, got {total_draws}")
        self.total_draws = total_draws
        self.seed = seed
        self.phase = -1
        self.subset: list[int] = []
        self.drawn = 0  # draws over the whole run
        self._pass = 0  # passes through the current subset
        self._position = 0  # position in the current pass
        self._order: list[int] = []

    def set_subset(self, phase: int, subset: Sequence[int]) -> None:
        if not subset:
            raise ValueError(f"phase {phase}: empty subset")
        self.phase, self.subset = phase, sorted(int(i) for i in subset)
        self._pass, self._position = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        key = ((self.seed * 1_000_003 + self.phase) * 1_000_003 + self._pass) % 2**63
        generator = torch.Generator().manual_seed(key)
        return [self.subset[i] for i in torch.randperm(len(self.subset), generator=generator).tolist()]

    def __len__(self) -> int:
        return self.total_draws

    def __iter__(self) -> Iterator[int]:
        while self.drawn < self.total_draws:
            if not self.subset:
                raise RuntimeError("PhaseSampler: no subset selected yet")
            if self._position == len(self._order):
                self._pass, self._position = self._pass + 1, 0
                self._order = self._shuffled()
            index = self._order[self._position]
            self._position += 1
            self.drawn += 1
            yield index

    def state_dict(self) -> dict:
        return {"phase": self.phase, "subset": list(self.subset), "drawn": self.drawn,
                "pass": self._pass, "position": self._position}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.subset, self.drawn = state["phase"], list(state["subset"]), state["drawn"]
        self._pass, self._position = state["pass"], state["position"]
        self._order = self._shuffled() if self.subset else []
