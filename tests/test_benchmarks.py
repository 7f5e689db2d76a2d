"""The benchmark drivers' own arithmetic: what they report must follow from what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
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


# --- gpu_parts / gpu_unpack: large assets to the GPU machine in pieces ----------------------------------

def _wheel(directory: Path, name: str, payload: bytes) -> Path:
    """A real (tiny) wheel of a package `name` holding `payload`, which pip can install offline."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": b"", f"{name}/data.bin": payload,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items()) + f"{dist}/RECORD,,\n"
    path = directory / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in {**files, f"{dist}/RECORD": record.encode()}.items():
            zf.writestr(n, d)
    return path


def _parts(tmp_path: Path, piece_size: int = 64 << 10) -> tuple[Path, dict, dict[str, bytes]]:
    """Pack a real wheel and two other files (one larger than three pieces, one empty) into pieces."""
    import random

    import gpu_parts

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    rng = random.Random(0)
    _wheel(wheels, "rheads_fake", rng.randbytes(100_000))
    (wheels / "blob.bin").write_bytes(rng.randbytes(3 * piece_size + 123))
    (wheels / "empty.bin").write_bytes(b"")
    out = tmp_path / "parts"
    assert gpu_parts.main(["--out", str(out), "--wheels", str(wheels), "--piece-size", str(piece_size)]) == 0
    originals = {f.name: f.read_bytes() for f in wheels.iterdir()}
    return out, json.loads((out / "manifest.json").read_text()), originals


def _wheel_data(wheel: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        return zf.read("rheads_fake/data.bin")


def _setup(out: Path, tmp_path: Path, *args: str):
    """setup.sh as the GPU machine runs it (from the repository root), with this Python and folders under tmp."""
    import os
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable, "PIECES": str(tmp_path / "p"), "SITE": str(tmp_path / "site")}
    return subprocess.run(["bash", str(out / "setup.sh"), *args], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True)


def test_pieces_never_exceed_the_limit_and_reassemble_byte_identical(tmp_path):
    import subprocess

    piece_size = 64 << 10
    out, manifest, originals = _parts(tmp_path, piece_size)
    sizes = [(out / p["name"]).stat().st_size for p in manifest["pieces"]]
    total = sum(len(data) for data in originals.values())
    assert max(sizes) <= piece_size and sum(sizes) == total
    assert len(sizes) == -(-total // piece_size)  # fixed-size slices: only the last piece is short
    assert [p["size"] for p in manifest["pieces"]] == sizes
    for i in range(len(sizes)):
        done = _setup(out, tmp_path, "copy", str(i))
        assert done.returncode == 0, done.stderr
    assert "still missing: none" in done.stdout
    done = _setup(out, tmp_path, "install")
    assert done.returncode == 0, done.stderr
    for name, data in originals.items():
        assert (tmp_path / "p" / "files" / name).read_bytes() == data
    installed = tmp_path / "site" / "rheads_fake" / "data.bin"
    assert installed.read_bytes() == _wheel_data(tmp_path / "wheels" / "rheads_fake-0.1-py3-none-any.whl")
    # the env file puts the installed wheels on the path; a second install finds them done
    check = f". {tmp_path / 'p' / 'env.sh'} && {sys.executable} -c 'import rheads_fake; print(rheads_fake.__file__)'"
    shown = subprocess.run(["bash", "-c", check], capture_output=True, text=True)
    assert shown.returncode == 0 and str(tmp_path / "site") in shown.stdout, shown.stderr
    assert _setup(out, tmp_path, "install").returncode == 0


def test_a_missing_or_damaged_piece_is_named(tmp_path):
    import gpu_unpack

    out, manifest, _ = _parts(tmp_path)
    names = [p["name"] for p in manifest["pieces"]]
    for i in range(len(names)):
        assert _setup(out, tmp_path, "copy", str(i)).returncode == 0
    pieces = tmp_path / "p"
    (pieces / names[1]).unlink()
    done = _setup(out, tmp_path, "install")
    assert done.returncode == 1 and f"missing {names[1]}" in done.stderr and "N in 1." in done.stderr
    assert not (tmp_path / "site").exists()
    data = bytearray((out / names[2]).read_bytes())
    data[100] ^= 1
    (pieces / names[2]).write_bytes(data)
    with pytest.raises(gpu_unpack.PartsError, match=f"missing {names[1]}; damaged {names[2]}. .* N in 1, 2"):
        gpu_unpack.assemble(manifest, pieces, tmp_path / "files")
    (out / names[2]).write_bytes(data)  # damaged on the way: the call that carries it says so
    done = _setup(out, tmp_path, "copy", "2")
    assert done.returncode == 1 and f"{names[2]} arrived damaged" in done.stderr
    done = _setup(out, tmp_path, "copy", str(len(names)))
    assert done.returncode == 1 and f"pieces 0 to {len(names) - 1}" in done.stderr


def test_the_calls_carry_one_piece_each_and_the_last_installs():
    import gpu_parts

    manifest = {"pieces": [{"name": f"piece{i:02d}"} for i in range(3)]}
    lines = gpu_parts.calls(manifest, ".gpuparts", "python3 x.py")
    assert len(lines) == 3 and all(line.count(".gpuparts/piece") == 1 for line in lines)
    assert '".gpuparts/piece01", ".gpuparts/setup.sh", ".gpuparts/manifest.json"' in lines[1]
    assert "install" not in lines[1] and lines[2].endswith('. /tmp/p/env.sh && python3 x.py")')
    assert gpu_parts.parse_size("60MiB") == 60 << 20 and gpu_parts.parse_size("1000") == 1000


# --- the references of tests/oracles.py at long lengths ------------------------------------------------

def test_the_chunked_reference_equals_the_whole_one(one_thread):
    """By blocks of queries (several, and one that ends mid-way) the masked reference is the same computation
    (on one thread: with several, the fp32 sums of a peaky random model can split differently by block)."""
    import oracles

    from rheads.engine import random_split

    shape = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16, intermediate_size=128,
                 max_position_embeddings=512, vocab_size=512)
    model = oracles.tiny_model("llama", shape, num_layers=4)
    split = random_split(4, 2, 0.5, seed=3)
    assert 0 < sum(split.num_full) < 8
    ids = oracles.random_prompt(300, seed=0, vocab=512)
    whole = oracles.reference_logprobs(model, ids, split, sink=4, window=16)
    for block in (64, 300, 1000):
        chunked = oracles.reference_logprobs(model, ids, split, sink=4, window=16, block=block)
        assert (chunked - whole).abs().max() < 1e-5, block
    last = oracles.reference_logprobs(model, ids, split, sink=4, window=16, block=64, last=10)
    assert last.shape == (10, 512) and (last - whole[-10:]).abs().max() < 1e-5
    full = oracles.reference_logprobs(model, ids, block=64)  # the mask matters far beyond that tolerance
    assert (full - whole).abs().max() > 0.1


# --- long_context_oracle: the engine against the chunked reference -------------------------------------

def _tiny_model_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny random Llama with SmolLM2's tokenizer (needle prompts need real text) and a synthetic profile."""
    import oracles
    from transformers import AutoTokenizer

    from rheads.models import resolve_model
    from rheads.profiling.profile import ModelIdentity, synthetic_profile

    shape = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16, intermediate_size=128,
                 max_position_embeddings=512, vocab_size=49152)
    # small weights (bf16's rounding would move a larger random model's logprobs past most margins), but for q
    # and k: attention peaky enough that the window matters (as tests/test_served_oracles.py's models)
    model = oracles.tiny_model("llama", shape, num_layers=4, initializer_range=0.05)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(2.0)
    directory = tmp_path / "tiny"
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path).save_pretrained(directory)
    profile = tmp_path / "tiny.json"
    synthetic_profile(ModelIdentity.from_config(model.config, "tiny"), seed=1).save(profile)
    return directory, profile


def _oracle_args(model_dir: Path, profile: Path, *more: str) -> list[str]:
    """A short run: prefill in several chunks, the reference in several blocks, a window far shorter than the
    prompt."""
    return ["--model", str(model_dir), "--profile", str(profile), "--length", "300", "--max-tokens", "6",
            "--sink", "4", "--window", "16", "--block", "64", "--device", "cpu", "--max-num-batched-tokens", "128",
            "--kv-cache-gib", "0.05", *more]


def test_long_context_oracle_on_a_tiny_model(tmp_path, one_thread):
    """The script end to end: in fp32 the engine equals the reference at both budgets, and the report says so."""
    import long_context_oracle

    model_dir, profile = _tiny_model_dir(tmp_path)
    out = tmp_path / "report.json"
    report = long_context_oracle.main(_oracle_args(model_dir, profile, "--prompts", "2", "--budgets", "1.0,0.5",
                                                   "--dtype", "float32", "--json", str(out)))
    rows = report["rows"]
    assert [(r["budget"], r["prompt"]) for r in rows] == [(1.0, 0), (1.0, 1), (0.5, 0), (0.5, 1)]
    assert [r["fraction_full"] for r in rows] == [1.0, 1.0, 0.5, 0.5]
    for r in rows:
        assert r["tokens"] == 6 and r["max_diff"] < 1e-4 and r["greedy_agree"] == 6, r
        assert r["ok"] and r["pipelined_same"] and r["yardstick_max"] == 0.0, r
    assert json.loads(out.read_text())["rows"] == rows


def test_long_context_oracle_sees_a_wrong_window(tmp_path, one_thread, monkeypatch):
    """Its verdict is not blind: against a reference whose window is off by a few keys, the compressed run fails
    (in bf16 too, where the bound allows the dtype's own error)."""
    import long_context_oracle
    import oracles

    reference = oracles.reference_logprobs
    monkeypatch.setattr(oracles, "reference_logprobs", lambda *a, window, **kw: reference(*a, window=window - 4, **kw))
    model_dir, profile = _tiny_model_dir(tmp_path)
    for dtype in ("float32", "bfloat16"):
        rows = long_context_oracle.main(_oracle_args(model_dir, profile, "--prompts", "1", "--budgets", "1.0,0.5",
                                                     "--dtype", dtype))["rows"]
        assert [r["ok"] for r in rows] == [True, False], (dtype, rows)


def _eval_run(path: Path, window: int, configs: dict[str, tuple[str, int, list[bool]]], lengths=(64, 32)) -> None:
    """An `rheads eval niah` output directory: cells at each length, and a summary whose full and window
    rows carry the engine's own KV bytes (the formula the comparison must reproduce for the other rows)."""
    from rheads.engine.heads import HeadSplit
    from rheads.evaluation.niah_eval import kv_bytes_per_sequence

    path.mkdir(parents=True)
    cells = [{"config": name, "selection": selection, "budget": full / 4, "seed": None, "full_heads": full,
              "length": length, "depth": i / 10, "needle": 0, "correct": ok}
             for name, (selection, full, oks) in configs.items() for length in lengths for i, ok in enumerate(oks)]
    (path / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
    def kv(full: int) -> int:
        split = HeadSplit(full=((0, 1)[:full // 2],) * 2, num_kv_heads=2)
        return kv_bytes_per_sequence(split, 8, 2, 16, 4, window, max(lengths))
    summary = {"lengths": list(lengths), "meta": {"window": window, "page_size": 16},
               "configs": [{"selection": "full", "total_heads": 4, "kv_bytes_per_seq": kv(4)},
                           {"selection": "window", "total_heads": 4, "kv_bytes_per_seq": kv(0)}]}
    (path / "summary.json").write_text(json.dumps(summary))


def test_accuracy_compare_counts_cells_and_prices_each_configuration_by_the_engines_formula(tmp_path):
    from accuracy_compare import compare, format_table

    from rheads.engine.heads import HeadSplit
    from rheads.evaluation.niah_eval import kv_bytes_per_sequence

    _eval_run(tmp_path / "a", 8, {"full": ("full", 4, [True, True, False]), "window": ("window", 0, [False] * 3),
                                  "retrieval-0.5": ("retrieval", 2, [True, False, False])})
    _eval_run(tmp_path / "b", 8, {"full": ("full", 4, [True, True, False]), "window": ("window", 0, [False] * 3),
                                  "retrieval-0.5": ("retrieval", 2, [True, True, False])})
    for length in (64, 32):
        rows = compare([("a", tmp_path / "a"), ("b", tmp_path / "b")], length)
        # the shared full and window rows once, each run's own configuration under its label
        assert [(r["what"], r["correct"], r["cells"]) for r in rows] == [
            ("window 8 alone", 0, 3), ("a retrieval-0.5, window 8", 1, 3), ("b retrieval-0.5, window 8", 2, 3),
            ("full cache", 2, 3)]
        half = kv_bytes_per_sequence(HeadSplit(full=((0,), (1,)), num_kv_heads=2), 8, 2, 16, 4, 8, length)
        assert rows[1]["kv_bytes"] == rows[2]["kv_bytes"] == half
        assert rows[-1]["kv_bytes"] == kv_bytes_per_sequence(HeadSplit(full=((0, 1),) * 2, num_kv_heads=2), 8, 2,
                                                             16, 4, 8, length)
    table = format_table(rows, 32)
    assert "| b retrieval-0.5, window 8 | 2 |" in table and "2/3 | +0.0 |" in table and "1/3 | -33.3 |" in table
