"""Rollout store: round trip, resume, append-only chunks, interrupted writes, validation errors."""

import pytest
import torch

from openrlhf_cropi.core.store import PromptRollouts, RolloutStore, StoreError

META = {"model": "tiny", "temperature": 1.0, "max_tokens": 64}


def record(i: int, k: int = 3) -> PromptRollouts:
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
        behavior_logprobs=[-torch.rand(len(r), generator=g) for r in responses],
    )


def assert_same(a: PromptRollouts, b: PromptRollouts) -> None:
    assert (a.index, a.text, a.label, a.row) == (b.index, b.text, b.label, b.row)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.rewards, b.rewards)
    assert len(a.responses) == len(b.responses)
    for x, y, bx, by in zip(a.responses, b.responses, a.behavior_logprobs, b.behavior_logprobs):
        assert torch.equal(x, y) and torch.equal(bx, by)


def test_round_trip_in_chunks(tmp_path):
    store = RolloutStore.create(tmp_path / "s", META)
    records = [record(i, k=2 + i % 3) for i in (4, 0, 7, 1, 9)]
    with store.writer(chunk_size=2) as w:
        for r in records:
            w.add(r)
    assert sorted(p.name for p in (tmp_path / "s").glob("chunk-*.pt")) == [
        "chunk-000000.pt", "chunk-000001.pt", "chunk-000002.pt"]
    again = RolloutStore(tmp_path / "s")
    assert again.meta == META and again.indices() == [0, 1, 4, 7, 9] and len(again) == 5
    for r in records:
        assert_same(again.get(r.index), r)
    assert [r.index for r in again] == [4, 0, 7, 1, 9]  # chunk order
    with pytest.raises(KeyError):
        again.get(2)
    c = torch.load(tmp_path / "s" / "chunk-000000.pt", weights_only=True)  # documented layout
    assert c["prompt_tokens"].dtype == torch.int32 and c["behavior_logprobs"].dtype == torch.float32
    assert len(c["response_offsets"]) == int(c["num_responses"].sum()) + 1


def test_resume_and_duplicates(tmp_path):
    store = RolloutStore.create(tmp_path / "s", META)
    store.append([record(0), record(1)])
    with pytest.raises(StoreError, match="already exists"):
        RolloutStore.create(tmp_path / "s", META)
    resumed = RolloutStore.create(tmp_path / "s", META, exist_ok=True)
    assert resumed.indices() == [0, 1]
    with pytest.raises(StoreError, match="made with"):
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
    assert names == ["chunk-000000.pt", "meta.json"]  # no partial chunk, temp file cleaned up
    # A hard kill leaves a temp file behind: it is ignored.
    (tmp_path / "s" / ".chunk-000001.pt.tmp.999").write_bytes(b"garbage")
    reopened = RolloutStore(tmp_path / "s")
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
    with pytest.raises(StoreError, match="response 1 has"):
        bad = [ok.behavior_logprobs[0], torch.zeros(len(ok.responses[1]) + 1), ok.behavior_logprobs[2]]
        PromptRollouts(**fields, responses=ok.responses, rewards=ok.rewards, behavior_logprobs=bad)
    with pytest.raises(StoreError, match="empty"):
        PromptRollouts(**fields, responses=[[]], rewards=[1.0], behavior_logprobs=[[]])
    with pytest.raises(StoreError, match="non-finite"):
        PromptRollouts(**fields, responses=[[1]], rewards=[float("nan")], behavior_logprobs=[[0.0]])


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
