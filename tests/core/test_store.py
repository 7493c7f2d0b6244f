"""Rollout store: round trip, resume, append-only chunks, interrupted writes, validation errors,
behavior log-probs added later, one writer at a time, and the token-free summary."""

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch

from openrlhf_cropi.core.advantages import Objective
from openrlhf_cropi.core.store import PromptRollouts, RolloutStore, StoreError

META = {"model": "tiny", "temperature": 1.0, "max_tokens": 64}


def record(i: int, k: int = 3, forced: bool = True) -> PromptRollouts:
    g = torch.Generator().manual_seed(i)
    responses = [torch.randint(0, 100, (1 + (i + j) % 5,), generator=g) for j in range(k)]
    return PromptRollouts(
        index=i,
        text=f"prompt {i} ü",
        label={"answer": i} if i % 2 else str(i),
        row={"prompt": f"prompt {i} ü", "label": i, "extra": [1, 2]},
        prompt_ids=torch.randint(0, 100, (2 + i % 3,), generator=g).tolist(),
        responses=responses,
        rewards=[float((i + j) % 2) for j in range(k)],
        behavior_logprobs=[-torch.rand(len(r), generator=g) for r in responses] if forced else None,
        truncated=[(i + j) % 3 == 0 for j in range(k)],
    )


def assert_same(a: PromptRollouts, b: PromptRollouts) -> None:
    assert (a.index, a.text, a.label, a.row) == (b.index, b.text, b.label, b.row)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.rewards, b.rewards)
    assert torch.equal(a.truncated, b.truncated)
    assert len(a.responses) == len(b.responses) and all(torch.equal(x, y) for x, y in zip(a.responses, b.responses))
    assert (a.behavior_logprobs is None) == (b.behavior_logprobs is None)
    for bx, by in zip(a.behavior_logprobs or [], b.behavior_logprobs or []):
        assert torch.equal(bx, by)


def test_round_trip_in_chunks(tmp_path):
    store = RolloutStore.create(tmp_path / "s", META)
    records = [record(i, k=2 + i % 3) for i in (4, 0, 7, 1, 9)]
    with store.writer(chunk_size=2) as w:
        for r in records:
            w.add(r)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.pt")) == [
        "behavior-000000.pt", "behavior-000001.pt", "behavior-000002.pt",
        "chunk-000000.pt", "chunk-000001.pt", "chunk-000002.pt"]
    again = RolloutStore(tmp_path / "s")
    assert again.meta == META and again.indices() == [0, 1, 4, 7, 9] and len(again) == 5
    for r in records:
        assert_same(again.get(r.index), r)
    assert [r.index for r in again] == [4, 0, 7, 1, 9]  # chunk order
    with pytest.raises(KeyError):
        again.get(2)
    c = torch.load(tmp_path / "s" / "chunk-000000.pt", weights_only=True)  # documented layout
    assert c["prompt_tokens"].dtype == torch.int32 and c["truncated"].dtype == torch.bool
    assert c["truncated"].tolist() == [t for r in records[:2] for t in r.truncated.tolist()]
    assert len(c["response_offsets"]) == int(c["num_responses"].sum()) + 1
    b = torch.load(tmp_path / "s" / "behavior-000000.pt", weights_only=True)
    assert b["index"].tolist() == [4, 0] and b["logprobs"].dtype == torch.float32
    assert len(b["logprobs"]) == len(c["response_tokens"])


def test_resume_and_duplicates(tmp_path):
    store = RolloutStore.create(tmp_path / "s", META)
    store.append([record(0), record(1)])
    with pytest.raises(StoreError, match="already exists"):
        RolloutStore.create(tmp_path / "s", META)
    del store  # its writer's lock goes with it
    resumed = RolloutStore.create(tmp_path / "s", META, exist_ok=True)
    assert resumed.indices() == [0, 1]
    with pytest.raises(StoreError, match=r"made with temperature=1.0 \(now 0.6\)$"):
        RolloutStore.create(tmp_path / "s", {**META, "temperature": 0.6}, exist_ok=True)
    with pytest.raises(StoreError, match="prompt 1 is already stored"):
        resumed.append([record(2), record(1)])
    with pytest.raises(StoreError, match="already stored"):
        resumed.append([record(3), record(3)])
    assert RolloutStore(tmp_path / "s").indices() == [0, 1]  # failed appends wrote nothing


def test_interrupted_write_loses_only_the_chunk_in_flight(tmp_path, monkeypatch):
    store = RolloutStore.create(tmp_path / "s", META)
    store.append([record(0), record(1)])

    def crash(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        store.append([record(2), record(3)])
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [".lock", "behavior-000000.pt", "chunk-000000.pt", "meta.json"]  # no partial chunk or temp file
    # A hard kill leaves a temp file behind: it is ignored.
    (tmp_path / "s" / ".chunk-000001.pt.tmp.999").write_bytes(b"garbage")
    del store
    reopened = RolloutStore.create(tmp_path / "s", META, exist_ok=True)
    assert reopened.indices() == [0, 1]
    reopened.append([record(2)])
    assert RolloutStore(tmp_path / "s").indices() == [0, 1, 2]


def test_writer_keeps_complete_records_when_the_loop_fails(tmp_path):
    store = RolloutStore.create(tmp_path / "s", META)
    with pytest.raises(RuntimeError):
        with store.writer(chunk_size=10) as w:
            w.add(record(0))
            w.add(record(1))
            raise RuntimeError("generation failed")
    assert RolloutStore(tmp_path / "s").indices() == [0, 1]


def test_record_validation_errors():
    ok = record(0)
    fields = dict(index=0, text="t", label=None, row={}, prompt_ids=[1, 2])
    with pytest.raises(StoreError, match="3 responses, 2 rewards"):
        PromptRollouts(**fields, responses=ok.responses, rewards=[0.0, 1.0], behavior_logprobs=ok.behavior_logprobs)
    with pytest.raises(StoreError, match="3 responses, 2 behavior log-prob rows"):
        PromptRollouts(**fields, responses=ok.responses, rewards=ok.rewards, behavior_logprobs=ok.behavior_logprobs[:2])
    with pytest.raises(StoreError, match="response 1 has"):
        bad = [ok.behavior_logprobs[0], torch.zeros(len(ok.responses[1]) + 1), ok.behavior_logprobs[2]]
        PromptRollouts(**fields, responses=ok.responses, rewards=ok.rewards, behavior_logprobs=bad)
    with pytest.raises(StoreError, match="empty"):
        PromptRollouts(**fields, responses=[[]], rewards=[1.0], behavior_logprobs=[[]])
    with pytest.raises(StoreError, match="non-finite"):
        PromptRollouts(**fields, responses=[[1]], rewards=[float("nan")], behavior_logprobs=[[0.0]])


def test_sampling_log_probs_kept_per_chunk(tmp_path):
    """The engine's log-probs of the sampled tokens: stored with their chunk when every record of
    it has them, read back per response; a chunk with a record lacking them stores none."""
    def sampled(rec: PromptRollouts) -> PromptRollouts:
        rec.sampling_logprobs = [-torch.arange(len(r), dtype=torch.float32) / (rec.index + 1) for r in rec.responses]
        rec.__post_init__()
        return rec

    store = RolloutStore.create(tmp_path / "s", META)
    store.append([sampled(record(0)), sampled(record(3))])
    store.append([sampled(record(1)), record(2)])  # one without: the chunk has none
    again = RolloutStore(tmp_path / "s")
    for i in (0, 3):
        got, want = again.get(i), sampled(record(i))
        assert_same(got, want)
        assert all(torch.equal(a, b) for a, b in zip(got.sampling_logprobs, want.sampling_logprobs))
    assert again.get(1).sampling_logprobs is None and again.get(2).sampling_logprobs is None
    assert "sampling_logprobs" not in torch.load(tmp_path / "s" / "chunk-000001.pt", weights_only=True)
    c = torch.load(tmp_path / "s" / "chunk-000000.pt", weights_only=True)
    c["sampling_logprobs"] = c["sampling_logprobs"][:-1]
    torch.save(c, tmp_path / "s" / "chunk-000000.pt")
    with pytest.raises(StoreError, match="chunk-000000.pt: sampling log-probs do not match"):
        RolloutStore(tmp_path / "s")
    with pytest.raises(StoreError, match="response 0 has non-finite sampling log-probs"):
        PromptRollouts(index=0, text="t", label=None, row={}, prompt_ids=[1], responses=[[5]], rewards=[1.0],
                       sampling_logprobs=[[float("-inf")]])  # fmt: skip


def test_corrupt_or_missing_store_errors_name_the_file(tmp_path):
    with pytest.raises(StoreError, match="no meta.json"):
        RolloutStore(tmp_path)
    store = RolloutStore.create(tmp_path / "s", META)
    store.append([record(0)])
    (tmp_path / "s" / "chunk-000001.pt").write_bytes(b"not a chunk")
    with pytest.raises(StoreError, match="chunk-000001.pt"):
        RolloutStore(tmp_path / "s")
    c = torch.load(tmp_path / "s" / "chunk-000000.pt", weights_only=True)
    c["rewards"] = c["rewards"][:-1]
    torch.save(c, tmp_path / "s" / "chunk-000001.pt")
    with pytest.raises(StoreError, match="chunk-000001.pt: rewards"):
        RolloutStore(tmp_path / "s")
    (tmp_path / "s" / "chunk-000001.pt").unlink()
    b = torch.load(tmp_path / "s" / "behavior-000000.pt", weights_only=True)
    b["index"] = torch.tensor([5])
    torch.save(b, tmp_path / "s" / "behavior-000001.pt")
    with pytest.raises(StoreError, match="behavior-000001.pt: prompt 5 already teacher-forced|behavior-000001.pt: log-probs of prompt 5"):
        RolloutStore(tmp_path / "s")
    (tmp_path / "s" / "behavior-000001.pt").unlink()
    # A store in the previous format says so instead of failing somewhere later.
    header = json.loads((tmp_path / "s" / "meta.json").read_text())
    (tmp_path / "s" / "meta.json").write_text(json.dumps({**header, "version": 2}))
    with pytest.raises(StoreError, match="version 2: make the rollouts again"):  # v2 has no truncation flags
        RolloutStore(tmp_path / "s")


def test_behavior_log_probs_added_later_and_the_marker(tmp_path):
    """Rollouts first, log beta later for some prompts only: the others stay marked as not teacher-forced."""
    store = RolloutStore.create(tmp_path / "s", META)
    full = [record(i) for i in range(4)]
    store.append([record(i, forced=False) for i in range(4)])
    assert [store.teacher_forced(i) for i in range(4)] == [False] * 4
    assert store.get(2).behavior_logprobs is None
    store.append_behavior({i: full[i].behavior_logprobs for i in (3, 1)})
    with pytest.raises(StoreError, match="opened for reading"):
        RolloutStore(tmp_path / "s").append_behavior({0: full[0].behavior_logprobs})
    del store
    again = RolloutStore.create(tmp_path / "s", META, exist_ok=True)
    assert [again.teacher_forced(i) for i in range(4)] == [False, True, False, True]
    for i in range(4):
        assert_same(again.get(i), full[i] if i in (1, 3) else record(i, forced=False))
    assert again.summary().teacher_forced.tolist() == [False, True, False, True]
    with pytest.raises(StoreError, match="prompt 1 is already teacher-forced"):
        again.append_behavior({1: full[1].behavior_logprobs})
    with pytest.raises(StoreError, match="prompt 9 has no rollouts"):
        again.append_behavior({9: full[1].behavior_logprobs})
    with pytest.raises(StoreError, match="prompt 0: response 1 has"):
        again.append_behavior({0: [full[0].behavior_logprobs[0], torch.zeros(99), full[0].behavior_logprobs[2]]})
    assert len(list((tmp_path / "s").glob("behavior-*.pt"))) == 1  # failed appends wrote nothing


def test_summary_matches_the_decoded_records(tmp_path):
    """The summary (read without tokens) against the records decoded one by one, in index order."""
    store = RolloutStore.create(tmp_path / "s", META)
    records = [record(i, k=2 + i % 4, forced=i % 3 == 0) for i in (7, 2, 9, 0, 5, 3, 8)]
    # A prompt with identical responses whose rewards differ: zero gradient although the rewards vary.
    r = records[1]
    records[1] = PromptRollouts(r.index, r.text, r.label, r.row, r.prompt_ids, [r.responses[0]] * len(r.responses),
                                [float(j % 2) for j in range(len(r.responses))])
    records[5] = PromptRollouts(3, "t", None, {}, [1], [[4], [5], [6]], [1.0, 1.0, 1.0])  # zero variance
    with store.writer(chunk_size=3) as w:
        for rec in records:
            w.add(rec)
    s = RolloutStore(tmp_path / "s").summary()
    want = sorted(records, key=lambda rec: rec.index)
    assert s.index.tolist() == [rec.index for rec in want] and len(s) == 7
    for p, rec in enumerate(want):
        assert s.rewards[s.offsets[p] : s.offsets[p + 1]].tolist() == rec.rewards.tolist()
        assert bool(s.teacher_forced[p]) == (rec.behavior_logprobs is not None)
        assert s.pass_rate[p].item() == pytest.approx(statistics.mean(rec.rewards.tolist()))
    assert s.zero_variance.tolist() == [rec.index == 3 for rec in want]
    assert s.zero_gradient.tolist() == [rec.index == 2 for rec in want]
    assert s.usable.tolist() == [rec.index not in (2, 3) for rec in want]
    assert len(RolloutStore.create(tmp_path / "empty", META).summary()) == 0


def test_summary_rewards_are_the_ones_training_sees(tmp_path):
    """Length penalties as OpenRLHF applies them decide reward variance, pass rate and usability:
    prompt 0's responses all pass, but one is overlong; prompt 1's pass and fail, but every
    response is truncated and a fixed reward of -0.5 replaces them all."""
    store = RolloutStore.create(tmp_path / "s", META)
    store.append([
        PromptRollouts(0, "a", None, {}, [1], [[2] * 3, [3] * 9, [4] * 4], [1.0, 1.0, 1.0]),
        PromptRollouts(1, "b", None, {}, [1], [[2] * 3, [3] * 3], [1.0, 0.0], truncated=[True, True]),
    ])  # fmt: skip
    plain = store.summary()
    assert plain.usable.tolist() == [False, True]
    overlong = Objective(overlong_buffer_len=4, overlong_penalty_factor=1.0, max_new_tokens=10)
    s = store.summary(overlong)  # limit 10 - 4 = 6 tokens: the 9-token response pays 3/4
    assert s.rewards[:3].tolist() == [1.0, 0.25, 1.0] and s.usable.tolist() == [True, True]
    assert s.pass_rate[0].item() == pytest.approx(0.75)
    s = store.summary(Objective(stop_properly_penalty_coef=-0.5))
    assert s.rewards[3:].tolist() == [-0.5, -0.5] and s.usable.tolist() == [False, False]
    s = store.summary(Objective(stop_properly_penalty_coef=0.5))
    assert s.rewards[3:].tolist() == [0.5, 0.0] and s.usable.tolist() == [False, True]
    # Copies whose non-binary rewards (0.1 / 0.3, inexact in float32) cancel: a zero gradient.
    store.append([PromptRollouts(2, "c", None, {}, [1], [[5], [5], [6], [6]], [0.1, 0.3, 0.1, 0.3])])
    s = store.summary(Objective(loss_agg_mode="token-mean"))
    assert s.zero_gradient.tolist() == [False, False, True] and not s.usable[2]
    assert list(store.prompts()) == [(0, "a", None), (1, "b", None), (2, "c", None)]


_HOLD = textwrap.dedent("""
    import sys, time
    from openrlhf_cropi.core.store import RolloutStore
    store = RolloutStore.create(sys.argv[1], {"model": "tiny"}, exist_ok=True)
    print("holding", flush=True)
    time.sleep(600)
""")


def test_one_writer_per_store_and_no_stale_lock(tmp_path):
    """A second writer (another process: a requeued job while the old one runs) stops at once,
    naming the holder; once the holder is killed, its lock is gone with it."""
    path = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(StoreError, match=rf"another process is writing this store \(pid {holder.pid} on .*--cropi.store_dir"):
            RolloutStore.create(path, {"model": "tiny"}, exist_ok=True)
        assert RolloutStore(path).indices() == []  # readers take no lock
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    store = RolloutStore.create(path, {"model": "tiny"}, exist_ok=True)  # the dead holder's lock is released
    store.append([record(0)])
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):  # also within one process
        RolloutStore.create(path, {"model": "tiny"}, exist_ok=True)


def test_a_published_chunk_is_never_overwritten(tmp_path, monkeypatch):
    """If another writer got a chunk's name first, publishing fails and leaves that chunk intact."""
    store = RolloutStore.create(tmp_path / "s", META)
    store.append([record(0)])
    before = (tmp_path / "s" / "chunk-000000.pt").read_bytes()
    monkeypatch.setattr(store, "_next", lambda pattern, stem: tmp_path / "s" / f"{stem}-000000.pt")
    with pytest.raises(StoreError, match="chunk-000000.pt already exists: another process wrote to this store"):
        store.append([record(1)])
    assert (tmp_path / "s" / "chunk-000000.pt").read_bytes() == before
    assert not [p for p in (tmp_path / "s").iterdir() if ".tmp." in p.name]
