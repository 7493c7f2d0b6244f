"""A phase at pool scale keeps the trainer's memory independent of the response length.

Two synthetic stores of 20k prompts x 8 responses, written without a model by
benchmarks/selection.py, with responses of up to 64 and up to 512 tokens (same rewards). The
trainer's driver-side phase (store summary, chunk-wise scoring, fusion, selection, phase
record) runs on each in a fresh process; the projected gradients, which the policy ranks
compute from a model, are rows of a fixed random bank there. Its peak RSS must not grow with
the store, which grows about sevenfold.
"""

import importlib.util
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_phase_peak_memory_does_not_grow_with_response_length(tmp_path):
    spec = importlib.util.spec_from_file_location("selection_benchmark", ROOT / "benchmarks/selection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--proj-dim", "4096", "--chunk", "512"])
    sizes, runs = {}, {}
    for tokens in (64, 512):
        store = tmp_path / f"L{tokens}"
        sizes[tokens] = bench.write_store(store, 20000, 8, tokens) / 2**20
        runs[tokens] = bench.measure(store, args)
        shutil.rmtree(store)
    peaks = {tokens: run["peak_rss_mb"] for tokens, run in runs.items()}
    print(f"store MB {sizes}, phase peak RSS MB {peaks}")
    assert sizes[512] > 5 * sizes[64] and sizes[512] - sizes[64] > 300
    assert runs[64]["prompts"] == 20000 and runs[64]["selected"] == runs[512]["selected"]  # same rewards, same phase
    assert len(runs[64]["selected"]) == 2000
    assert peaks[512] - peaks[64] < 32, peaks
