"""PhaseSampler inside torchdata's StatefulDataLoader, the way OpenRLHF's trainer drives it."""

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from openrlhf_cropi.sampler import PhaseSampler


def _loader(sampler):
    return StatefulDataLoader(list(range(100)), batch_size=1, sampler=sampler, collate_fn=lambda b: b[0])


def test_draws_only_from_the_subset_and_reshuffles_each_pass():
    sampler = PhaseSampler(total_draws=12, seed=0)
    sampler.set_subset(0, [7, 3, 9])
    draws = list(_loader(sampler))
    assert len(draws) == 12 and set(draws) == {3, 7, 9}
    passes = [draws[i : i + 3] for i in range(0, 12, 3)]
    assert all(sorted(p) == [3, 7, 9] for p in passes)  # every prompt once per pass
    assert len({tuple(p) for p in passes}) > 1  # and a new order per pass


def test_a_swap_takes_effect_at_the_next_draw_of_a_live_iterator():
    sampler = PhaseSampler(total_draws=8, seed=1)
    sampler.set_subset(0, [1, 2])
    it = iter(_loader(sampler))
    first = [next(it) for _ in range(4)]
    sampler.set_subset(1, [50, 60, 70, 80])
    rest = list(it)
    assert set(first) == {1, 2} and sorted(rest) == [50, 60, 70, 80]


def test_checkpointed_state_resumes_the_same_draws():
    def run(interrupt_at):
        sampler = PhaseSampler(total_draws=10, seed=5)
        sampler.set_subset(0, [4, 8, 15, 16, 23])
        loader = _loader(sampler)
        it = iter(loader)
        draws = [next(it) for _ in range(interrupt_at)]
        sampler.set_subset(1, [42, 43, 44])  # a phase boundary before the checkpoint
        state = loader.state_dict()
        fresh = PhaseSampler(total_draws=10, seed=5)  # a new process: nothing selected yet
        resumed = _loader(fresh)
        resumed.load_state_dict(state)
        return draws + list(resumed), fresh

    straight = PhaseSampler(total_draws=10, seed=5)
    straight.set_subset(0, [4, 8, 15, 16, 23])
    it = iter(_loader(straight))
    expected = [next(it) for _ in range(3)]
    straight.set_subset(1, [42, 43, 44])
    expected += list(it)

    draws, fresh = run(3)
    assert draws == expected
    assert fresh.phase == 1 and fresh.subset == [42, 43, 44] and fresh.drawn == 10


def test_state_without_subset_and_bad_input():
    with pytest.raises(ValueError):
        PhaseSampler(total_draws=0, seed=0)
    sampler = PhaseSampler(total_draws=3, seed=0)
    with pytest.raises(ValueError, match="empty subset"):
        sampler.set_subset(0, [])
    with pytest.raises(RuntimeError, match="no subset"):
        next(iter(sampler))
