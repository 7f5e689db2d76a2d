"""Plant the bugs the oracles exist to catch, one at a time, and check that the tests named for each fail.

    python tests/mutants.py            # the CPU's mutants (TRITON_INTERPRET=1 for the Triton kernel)
    python tests/mutants.py --cuda     # on a GPU (scripts/test-gpu's machine): the served path's instead of
                                       # the interpreter's

    python tests/mutants.py -k grammar # only the mutants whose name has "grammar" in it

Each mutant is a change of a line or two to the engine, applied to a copy of the working tree; the run fails
if a mutant survives (its tests pass) or no longer applies (the code it plants into has changed: update it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments
    where: str = "any"  # "cuda": only where a GPU runs the served path; "cpu": only without one
    env: tuple[tuple[str, str], ...] = ()


SERVED = "tests/test_served_oracles.py"
MUTANTS = [
    Mutant("window one wider (the SDPA band's rule)", "rheads/engine/attention.py",
           "(q_pos - k_pos < window)", "(q_pos - k_pos <= window)",
           ("tests/test_band.py", "tests/test_engine.py", "-k", "compressed or admits_exactly_the_band")),
    Mutant("window one wider (FlexAttention's mask)", "rheads/engine/band.py",
           "(query - key < window_t)", "(query - key <= window_t)", ("tests/test_band.py",)),
    Mutant("window one wider (FlexAttention's mask), served", "rheads/engine/band.py",
           "(query - key < window_t)", "(query - key <= window_t)", (SERVED, "-x", "-k", "compressed and cuda"),
           where="cuda"),
    Mutant("a history block dropped from the full heads' prefill", "rheads/engine/cudnn_prefill.py",
           "attend(_pad_rows(q, 0, _aligned(n) - n), history_k[:split], history_v[:split], False, scaling)",
           "attend(_pad_rows(q, 0, _aligned(n) - n), history_k[ALIGN:split], history_v[ALIGN:split], False, scaling)"
           " if split > ALIGN else attend(_pad_rows(q, 0, _aligned(n) - n), history_k[:split], history_v[:split],"
           " False, scaling)", ("tests/test_cudnn_prefill.py",)),
    Mutant("a history block dropped from the full heads' prefill, served", "rheads/engine/cudnn_prefill.py",
           "attend(_pad_rows(q, 0, _aligned(n) - n), history_k[:split], history_v[:split], False, scaling)",
           "attend(_pad_rows(q, 0, _aligned(n) - n), history_k[ALIGN:split], history_v[ALIGN:split], False, scaling)"
           " if split > ALIGN else attend(_pad_rows(q, 0, _aligned(n) - n), history_k[:split], history_v[:split],"
           " False, scaling)", (SERVED, "-x", "-k", "cuda-bf16 and not streaming"), where="cuda"),
    Mutant("the newest key dropped from the Triton decode", "rheads/engine/decode.py",
           "end = tl.minimum(start + per_split, length)", "end = tl.minimum(start + per_split, length - 1)",
           ("tests/test_decode_kernel.py", "-m", "triton"), env=(("TRITON_INTERPRET", "1"),), where="cpu"),
    Mutant("the newest key dropped from the Triton decode, served", "rheads/engine/decode.py",
           "end = tl.minimum(start + per_split, length)", "end = tl.minimum(start + per_split, length - 1)",
           ("tests/test_decode_kernel.py", SERVED, "-x", "-k", "bfloat16 or (cuda-bf16 and not streaming)"),
           where="cuda"),
    Mutant("an fp8 cache read without its scale (every PyTorch path)", "rheads/engine/kvquant.py",
           "return (x.float() * scale[:, None]).to(dtype)", "return x.float().to(dtype)",
           ("tests/test_fp8.py", "-x")),
    Mutant("the K scale left out of the Triton decode's scores", "rheads/engine/decode.py",
           "scale = scale * k_scale", "scale = scale",
           ("tests/test_decode_kernel.py", "-m", "triton", "-k", "fp8"), env=(("TRITON_INTERPRET", "1"),), where="cpu"),
    Mutant("a preemption that keeps num_cached", "rheads/engine/scheduler.py",
           "seq.num_cached, seq.status, seq.num_reused, seq.jump = 0, Status.WAITING, 0, None",
           "seq.status, seq.num_reused, seq.jump = Status.WAITING, 0, None",
           ("tests/test_engine.py", "-k", "tight_memory")),
    Mutant("a shared page freed while another sequence holds it", "rheads/engine/block_manager.py",
           "if self.ref_counts[page] == 0:", "if self.ref_counts[page] <= 1:",
           ("tests/test_block_manager.py",)),
    Mutant("a prefix hit's streaming heads not restored from its snapshot", "rheads/engine/block_manager.py",
           "if hit.snapshot is not None and hit.snapshot != seq.slot:", "if False:",
           ("tests/test_prefix_cache.py", "-x")),
    Mutant("a recompute of the streaming heads writing its own full heads over the shared pages",
           "rheads/engine/attention.py", "if not seq.reuses:", "if True:",
           ("tests/test_prefix_cache.py", "-x", "-k", "recomputes")),
    Mutant("a recompute of the streaming heads one layer's window short", "rheads/engine/cache.py",
           "return sum(w for _, w in geometries)", "return sum(w for _, w in geometries[1:])",
           ("tests/test_prefix_cache.py", "-x", "-k", "recomputes")),
    Mutant("a recompute of the streaming heads without their sinks", "rheads/engine/prefix_cache.py",
           "jump=(self.sink, recompute)", "jump=(0, recompute)",
           ("tests/test_prefix_cache.py", "-x", "-k", "recomputes")),
    Mutant("a follower rank that misses rank 0's snapshot copies", "rheads/engine/tensor_parallel.py",
           "step.apply_slot_ops(cache)", "pass", ("tests/test_tensor_parallel.py", "-x", "-k", "half-prefix")),
    Mutant("requests over one document recomputing it together instead of waiting for one snapshot",
           "rheads/engine/block_manager.py", "if hit.waits:", "if False:",
           ("tests/test_prefix_cache.py", "-x", "-k", "together")),
    Mutant("a tensor-parallel forward failure that keeps the group, its followers waiting in a collective",
           "rheads/engine/tensor_parallel.py", "dist.destroy_process_group()\n            raise EngineBrokenError",
           "raise EngineBrokenError", ("tests/test_tensor_parallel.py", "-x", "-k", "breaks")),
    Mutant("admission counting a hit's own cached pages as free for the rest", "rheads/engine/block_manager.py",
           "available = self.num_free_pages - sum(page in evictable for page in hit.pages)",
           "available = self.num_free_pages", ("tests/test_block_manager.py",)),
    Mutant("a block hash without its parent's", "rheads/engine/prefix_cache.py",
           'hashlib.sha256((hashes[-1] if hashes else b"") + tokens)', "hashlib.sha256(tokens)",
           ("tests/test_block_manager.py",)),
    Mutant("a block computed again left out of the chain while its evictable copy stays",
           "rheads/engine/prefix_cache.py",
           "if old is not None and old in self.evictable:", "if False:",
           ("tests/test_block_manager.py", "-x", "-k", "computed_again")),
    Mutant("a prefix hit covering the last prompt token", "rheads/engine/prefix_cache.py",
           "(seq.num_tokens - 1) // self.page_size)", "seq.num_tokens // self.page_size)",
           ("tests/test_prefix_cache.py", "-x", "-k", "same_prompt")),
    Mutant("a live sequence let into a slot kept for snapshots", "rheads/engine/block_manager.py",
           "return live < self.cache.num_seq_slots and", "return True and",
           ("tests/test_block_manager.py", "tests/test_prefix_cache.py", "-k", "snapshot_slots")),
    Mutant("StableLM's per-head q/k norms left in place when their heads move", "rheads/engine/heads.py",
           'per_head = getattr(norm, "norms", None)', "per_head = None",
           ("tests/test_architectures.py", "-k", "stablelm")),
    Mutant("the model's logit scaling skipped (Granite)", "rheads/engine/logits.py",
           "logits = logits / config.logits_scaling", "logits = logits",
           ("tests/test_architectures.py", "-k", "granite")),
    Mutant("q/k norms spanning the heads left in place by the permutation", "rheads/engine/heads.py",
           "            _permute_norm(norm, order, head_dim)", "            pass",
           ("tests/test_architectures.py", "-k", "olmo2 or cohere")),
    Mutant("Phi-3's fused qkv rows left in place by the permutation", "rheads/engine/heads.py",
           "blocks = [(part, order) for p in params for part, order in zip(p.split(sizes), orders)]", "blocks = []",
           ("tests/test_architectures.py", "-k", "phi3")),
    Mutant("a sliding-window layer given the streaming heads' sink + window", "rheads/engine/cache.py",
           "    return (0, window) if window else (config.sink, config.window)",
           "    return (config.sink, config.window)", ("tests/test_architectures.py", "-k", "hybrid")),
    Mutant("a budget that chooses among a sliding layer's heads", "rheads/engine/heads.py",
           "for h in range(kv) if windows[l] is None),", "for h in range(kv)),",
           ("tests/test_engine.py", "-k", "full_attention_layers_only")),
    Mutant("the attention soft-cap skipped in prefill", "rheads/engine/scores.py",
           "scores = torch.tanh(scores / mods.softcap) * mods.softcap", "scores = scores",
           ("tests/test_architectures.py", "-k", "gemma2")),
    Mutant("GPT-OSS's sinks left in place by the permutation", "rheads/engine/heads.py",
           "attn.sinks.copy_(attn.sinks[q_order])", "attn.sinks.copy_(attn.sinks)",
           ("tests/test_architectures.py", "-k", "gpt_oss")),
    Mutant("the learned sink in no split of the Triton decode", "rheads/engine/decode.py",
           "if s == 0:  # the sink", "if s == -1:  # the sink",
           ("tests/test_decode_kernel.py", "-m", "triton", "-k", "softcap"), env=(("TRITON_INTERPRET", "1"),),
           where="cpu"),
    Mutant("the soft-cap skipped in the Triton decode, served", "rheads/engine/decode.py",
           "scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)", "scores = scores",
           ("tests/test_decode_kernel.py", SERVED, "-x", "-k", "softcap or (hybrid and gemma2 and cuda)"),
           where="cuda"),
    Mutant("the profiler blind to a layer's sliding window", "rheads/profiling/profiler.py",
           'window, mods = kwargs.get("sliding_window"), ScoreMods.of(kwargs)',
           "window, mods = None, ScoreMods.of(kwargs)",
           ("tests/test_profiler.py", "-k", "matches_transformers")),
    Mutant("logprobs reported after the penalties", "rheads/engine/sampler.py",
           "logprobs = raw.log_softmax(-1)", "logprobs = logits.log_softmax(-1)", ("tests/test_penalties.py",)),
    Mutant("a penalized row pipelined before its last token reaches the host", "rheads/engine/runner.py",
           "is_plain(s.params, s.generator) and not s.params.penalized", "is_plain(s.params, s.generator)",
           ("tests/test_penalties.py", "-k", "pipelined")),
    Mutant("min_tokens one short", "rheads/engine/sampler.py",
           "if len(s.output_ids) < p.min_tokens", "if len(s.output_ids) < p.min_tokens - 1",
           ("tests/test_penalties.py",)),
    Mutant("a grammar row pipelined before its matcher takes its token", "rheads/engine/pipeline.py",
           "        outputs = update(scheduled, previous.read())\n        result = self.runner.sample(scheduled, logits, defer=True)\n",
           "        result = self.runner.sample(scheduled, logits, defer=True)\n        outputs = update(scheduled, previous.read())\n",
           ("tests/test_grammar.py",)),
    Mutant("a finished grammar row masked in the pipelined step after it", "rheads/engine/grammar.py",
           "return [seq.matcher if seq.status is Status.RUNNING else None for seq in seqs]",
           "return [seq.matcher for seq in seqs]", ("tests/test_grammar.py", "-k", "unmasked")),
    Mutant("a grammar's mask left off its row", "rheads/engine/grammar.py",
           'return logits.masked_fill(~allowed, float("-inf"))', "return logits", ("tests/test_grammar.py",)),
    Mutant("min_tokens holding back a grammar's only token", "rheads/engine/sampler.py",
           "held &= (torch.isfinite(picked) & ~held).any(-1, keepdim=True)", "held = held",
           ("tests/test_grammar.py", "-k", "min_tokens")),
]


def tree_copy() -> Path:
    """The working tree as it is: tracked and untracked files git does not ignore (without git, as on
    the GPU machine's copy, everything but caches and environments)."""
    target = Path(tempfile.mkdtemp(prefix="rheads-mutant-")) / "tree"
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".gpuparts",
                                                                    ".whl", ".bench", "*.egg-info"))
        return target
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def try_mutant(mutant: Mutant) -> tuple[bool, str]:
    """(killed, what the tests said)."""
    tree = tree_copy()
    try:
        path = tree / mutant.path
        source = path.read_text()
        if source.count(mutant.old) != 1:
            return False, f"does not apply: {mutant.old!r} is not in {mutant.path} exactly once"
        path.write_text(source.replace(mutant.old, mutant.new))
        env = {**os.environ, **dict(mutant.env), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mutant.tests],
                              cwd=tree, env=env, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        tests = sorted({line.split()[1].split("[")[0] for line in failed})  # the failing tests, not their cases
        summary = f"{', '.join(tests)} | " + (lines[-1] if lines else done.stderr[-300:])
        return done.returncode == 1 and bool(failed), summary
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="the served path's mutants too (needs a GPU)")
    parser.add_argument("-k", dest="names", action="append", default=[], metavar="TEXT",
                        help="only the mutants whose name contains TEXT (repeat for several)")
    args = parser.parse_args()
    survivors = 0
    for mutant in MUTANTS:
        if mutant.where == ("cpu" if args.cuda else "cuda"):
            continue
        if args.names and not any(text in mutant.name for text in args.names):
            continue
        killed, said = try_mutant(mutant)
        survivors += not killed
        print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name}: {' '.join(mutant.tests)}\n         {said}",
              flush=True)
    print(f"{survivors} mutant(s) survived" if survivors else "every mutant was killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
