"""The benchmark drivers' own arithmetic: what they report must follow from what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_serving import decode_steps, format_arrivals, open_report, ratios, save  # noqa: E402
from plan_coverage import wave  # noqa: E402
from load import Record, decoding_concurrency, percentile  # noqa: E402

from rheads.engine.cache import CacheUsage  # noqa: E402
from rheads.engine.llm import StepStats  # noqa: E402
from server.metrics import Metrics  # noqa: E402


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)


def test_decoding_concurrency_counts_overlap_and_rate_at_peak():
    # three streams: A 0-10 s, B 2-6 s, C 4-8 s (first to last token), one token a second each
    records = [Record("completed", start=s, token_times=[float(t) for t in range(0, n + 1)])
               for s, n in ((0.0, 10), (2.0, 4), (4.0, 4))]
    view = decoding_concurrency(records)
    assert view["peak"] == 3
    assert view["seconds_at_peak"] == pytest.approx(2.0)  # 4 s to 6 s, all three streaming
    assert view["tokens_per_s_at_peak"] == pytest.approx(3.0)  # 2 tokens each in (4, 6]
    assert decoding_concurrency([Record("failed")])["peak"] == 0


class _Engine:
    """What Metrics.observe_engine reads, with a scripted last step."""

    num_running = num_waiting = 0
    prefix_cache_totals = (0, 0)

    class scheduler:  # noqa: N801 - mirrors LLMEngine.scheduler
        num_preemptions = 0

    def __init__(self):
        self.last_step = None

    def usage(self) -> CacheUsage:
        return CacheUsage(1, 0, 1, 0, 0, 0, 1)


def test_decode_step_figures_from_the_servers_own_metrics():
    """gpu_serving reads rheads:engine_step_* as the server writes them: a contract between the two."""
    import gpu_serving

    metrics, engine = Metrics("m"), _Engine()
    before = gpu_serving._step_totals_from_text(generate_latest(metrics.registry).decode())
    for seconds, seqs, kv in ((0.02, 4, 4e9), (0.03, 8, 8e9)):
        engine.last_step = StepStats(True, seqs, seqs, seconds, int(kv))
        metrics.observe_engine(engine)
    engine.last_step = StepStats(False, 2, 500, 0.5, int(1e9))  # a prefill step: not a decode step
    metrics.observe_engine(engine)
    metrics.observe_engine(engine)  # the same step seen twice counts once
    after = gpu_serving._step_totals_from_text(generate_latest(metrics.registry).decode())
    steps = decode_steps(before, after, weights_bytes=int(15e9), bandwidth=3e12)
    assert steps["steps"] == 2 and steps["mean_batch"] == 6
    assert steps["mean_step_s"] == pytest.approx(0.025)
    limit = (2 * 15e9 + 12e9) / 3e12  # weights read by each step plus the KV both read
    assert steps["step_over_limit"] == pytest.approx(0.05 / limit)
    assert decode_steps(after, after, 1, 1.0) is None


def test_ratios_read_the_32k_runs():
    def run(peak, throughput, step):
        return {"contexts": {"32768": {"saturation": {"output_token_throughput": throughput,
                                                       "decoding": {"peak": peak, "tokens_per_s_at_peak": 2 * throughput}},
                                        "decode_steps": {"step_over_limit": step}}}}
    report = {"configs": {"rheads-1.0": run(7, 100.0, 1.5), "rheads-0.5": run(14, 150.0, 1.8),
                          "transformers serve": run(6, 2.0, None)}}
    r = ratios(report)
    assert r["concurrency_ratio_32k"] == 2.0 and r["throughput_ratio_32k"] == 1.5
    assert r["throughput_vs_peer_32k"] == 75.0 and r["decode_step_over_limit"] == 1.8


def test_a_section_run_writes_beside_the_main_report(tmp_path):
    """--section NAME puts a run under one key of the JSON and leaves the rest as it was; --merge keeps the
    contexts a run does not measure, in the main report or in a section."""
    def measured(context: str, throughput: float) -> dict:
        done = {"requests": {"completed": 1, "sent": 1}}
        return {"contexts": {context: {"saturation": {"output_token_throughput": throughput, **done}, "rate": done}}}

    path = tmp_path / "gpu_serving.json"
    whole, main = open_report(path, merge=False, section=None)
    main["configs"]["rheads-1.0"] = measured("8192", 1.0)
    main["device"] = "gpu"
    save(whole, main, path)
    whole, long_output = open_report(path, merge=False, section="long_output")
    long_output["configs"]["rheads-0.5"] = measured("32768", 2.0)
    save(whole, long_output, path)
    written = json.loads(path.read_text())
    assert written["device"] == "gpu" and list(written["configs"]) == ["rheads-1.0"]
    assert list(written["long_output"]["configs"]) == ["rheads-0.5"] and "ratios" in written["long_output"]
    assert len(written["tables"]) == len(written["long_output"]["tables"]) == 1
    whole, merged = open_report(path, merge=True, section="long_output")
    assert merged["configs"] == written["long_output"]["configs"] and whole["configs"] == written["configs"]
    assert open_report(path, merge=False, section=None) == ({"configs": {}}, {"configs": {}})


def test_plan_coverage_of_a_wave():
    """Prompts of whole chunks meet planned cuDNN shapes only, whatever decodes beside them; uneven ones
    leave their tails and some first-block pieces to flash."""
    share, chunks, planned = wave([4096] * 6, chunk=1024, max_tokens=8, max_num_seqs=8)
    assert share == 1.0 and chunks == planned == 6 * 4
    # The scheduler feeds 1024 prompt tokens a step, oldest prompt first (decodes ride outside), and no chunk
    # crosses a multiple of 1024: a prompt's tail leaves the rest of its step to the next prompt. Planned at
    # start-up (max_len 4008): 1024 queries after 0, 1023, 1024, 2047 and 2048 keys, i.e. causal blocks of 1024
    # or 1536 rows (the keys past the last multiple of 512, then the chunk, padded to 512) beside unmasked
    # histories of 512 to 2048 keys. A piece that fits a 512-row causal block has no plan, and padding it to
    # 1024 queries would cost over twice its work, more than flash's 1.8x; nothing after 3072 keys is planned.
    prefills = [  # (queries, keys before them, on the planned cuDNN path), prompt by prompt
        (1024, 0, True), (1024, 1024, True), (952, 2048, True),  # 3000; 952 pads to the planned 1024-row block
        (72, 0, False), (952, 72, True), (1024, 1024, True), (1024, 2048, True), (928, 3072, False),  # 4000
        (72, 0, False), (96, 72, False), (856, 168, True), (1024, 1024, True), (452, 2048, False),  # 2500
        (168, 0, False), (572, 168, True), (284, 740, False), (1024, 1024, True), (1024, 2048, True),  # 3900
        (828, 3072, False)]
    assert [sum(n for n, _, _ in prefills[i:j]) for i, j in ((0, 3), (3, 8), (8, 13), (13, 19))] == [
        3000, 4000, 2500, 3900]

    def work(n: int, start: int) -> float:  # query i of the chunk sees the start keys before it and i + 1 of its own
        return n * start + n * (n + 1) / 2

    expected = sum(work(n, s) for n, s, hit in prefills if hit) / sum(work(n, s) for n, s, _ in prefills)
    share, chunks, planned = wave([3000, 4000, 2500, 3900], chunk=1024, max_tokens=8, max_num_seqs=8)
    assert (chunks, planned) == (len(prefills), sum(hit for _, _, hit in prefills)) == (19, 11)
    assert share == pytest.approx(expected, rel=1e-12) and round(expected, 4) == 0.6782


def test_the_arrivals_table_reads_each_phase():
    """Milliseconds from seconds, each row from its own phase, counts as completed / sent; no table where no
    configuration ran the phase."""
    def phase(itl_p50: float, itl_p99: float, ttft_p50: float = 0.0) -> dict:
        return {"config": {"rate": 4.0}, "requests": {"completed": 9, "sent": 10}, "output_token_throughput": 50.0,
                "itl_s": {"p50": itl_p50, "p99": itl_p99}, "ttft_s": {"p50": ttft_p50, "p99": None}}

    arrivals = {"streams_alone": phase(0.008, 0.010), "streams_beside_arrivals": phase(0.009, 0.075),
                "arrivals": phase(0.0, 0.0, ttft_p50=0.120)}
    report = {"configs": {"rheads-0.5": {"contexts": {}, "arrivals": arrivals}, "rheads-1.0": {"contexts": {}}}}
    rows = dict(line.rsplit(None, 1) for line in format_arrivals(report).splitlines()[2:])
    assert rows["streams' ITL p99 alone (ms)"] == "10.0" and rows["streams' ITL p99 beside arrivals"] == "75.0"
    assert rows["arrivals' TTFT p50 (ms)"] == "120" and rows["arrivals' TTFT p99 (ms)"] == "-"
    assert rows["arrivals completed / sent"] == "9/10"
    assert format_arrivals({"configs": {"rheads-1.0": {"contexts": {}}}}) is None
