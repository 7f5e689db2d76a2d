"""The retrieval-head profile: one versioned JSON file per model, defined by the pydantic model below.

The profiler writes it, the importers write it, the engine reads it to choose which KV heads keep a
full cache. Loading one against a model it was not made for fails with a message saying why.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

FORMAT_VERSION = 1
KvAggregate = Literal["max", "mean"]
# a sample's per-head score: copy (Wu et al.: share of the answer tokens the head copied by its argmax) or
# attention (its mean attention mass on the answer while the model decodes)
HeadScore = Literal["copy", "attention"]

# The config fields that decide a model's shape and numerics; their hash is the profile's fingerprint.
FINGERPRINT_FIELDS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "rope_theta",
)


class ProfileError(ValueError):
    """A profile file that cannot be read or does not fit the model; the message says what to do."""


class ModelIdentity(BaseModel):
    """Which model a profile belongs to: its name, its attention shape and a fingerprint of its config."""

    name: str
    architecture: str
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    config_fingerprint: str | None = None  # None for imported profiles, whose configs we only know by shape
    config_fields: dict[str, Any] = Field(default_factory=dict)
    # per layer, the model's own sliding window (None: full attention); None for a model without sliding
    # layers, and in profiles written before hybrid models were served
    layer_windows: list[int | None] | None = None

    @model_validator(mode="after")
    def _groups_divide(self) -> "ModelIdentity":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.layer_windows is not None and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows must have one entry per layer ({self.num_layers})")
        return self

    @property
    def windows(self) -> list[int | None]:
        """Per layer, its sliding window or None (full attention), for every layer."""
        return self.layer_windows or [None] * self.num_layers

    @classmethod
    def from_config(cls, config: Any, name: str) -> "ModelIdentity":
        """Identity of a transformers config (text config for multimodal wrappers)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        fields = {key: _config_value(config, key) for key in FINGERPRINT_FIELDS}
        architectures = getattr(config, "architectures", None) or [type(config).__name__]
        windows = layer_windows(config)
        return cls(
            name=name,
            architecture=architectures[0],
            num_layers=fields["num_hidden_layers"],
            num_attention_heads=fields["num_attention_heads"],
            num_key_value_heads=fields["num_key_value_heads"],
            head_dim=fields["head_dim"],
            config_fingerprint=fingerprint(fields),
            config_fields=fields,
            layer_windows=windows if any(windows) else None,
        )

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def head_dim_of(config: Any) -> int:
    """Per-head width: the config's head_dim where it has one, else hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the window of a sliding-window layer (a query at q sees keys k with q - k < window, as
    transformers masks it), None for a full-attention one: from `layer_types` where the config has them,
    else Mistral's and Qwen2's global `sliding_window` (with `use_sliding_window`, where it exists)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    every = window if getattr(config, "use_sliding_window", True) else None
    return [every or None] * config.num_hidden_layers


def _config_value(config: Any, key: str) -> Any:
    if key == "head_dim":
        return head_dim_of(config)
    if key == "num_key_value_heads":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if key == "rope_theta":
        rope = getattr(config, "rope_parameters", None) or {}
        value = rope.get("rope_theta") if isinstance(rope, dict) else None
        value = value if value is not None else getattr(config, "rope_theta", None)
        return float(value) if value is not None else None
    return getattr(config, key, None)


def fingerprint(fields: dict[str, Any]) -> str:
    """Short stable hash of the config fields that decide the model's shape and numerics."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class ProfileMethod(BaseModel):
    """How the scores were obtained: our needle-in-a-haystack profiler or an importer, with its settings."""

    name: Literal["retrieval_head_niah", "import_retrieval_head", "import_duo_attention", "synthetic_random"]
    kv_aggregate: KvAggregate = "max"
    params: dict[str, Any] = Field(default_factory=dict)


class SampleRecord(BaseModel):
    """One needle-in-a-haystack run: where the needle was, what the model said, which heads copied."""

    needle_index: int
    context_length: int
    depth: float
    prompt_tokens: int
    response: str
    recall: float
    kept: bool
    head_scores: dict[str, float] = Field(default_factory=dict)  # "layer-head" -> copy score, non-zero only
    head_attention: dict[str, float] = Field(default_factory=dict)  # "layer-head" -> attention score, non-zero


class Profile(BaseModel):
    """Per-query-head and per-KV-head retrieval scores of one model."""

    format_version: Literal[1] = FORMAT_VERSION
    model: ModelIdentity
    method: ProfileMethod
    samples_total: int = Field(ge=0)
    samples_kept: int = Field(ge=0)
    # the budget `rheads serve` uses with this profile unless told otherwise: the smallest at which the
    # retrieval heads kept the full cache's needle accuracy (`rheads eval niah`); None: not measured
    default_budget: float | None = Field(default=None, ge=0, le=1)
    default_window: int | None = Field(default=None, gt=0)  # likewise the streaming heads' window; None: 256
    calibration: dict[str, Any] | None = None  # how `rheads calibrate` chose them: the grid and every row
    query_head_scores: list[list[float]]  # [layer][query head]
    kv_head_scores: list[list[float]]  # [layer][kv head]
    samples: list[SampleRecord] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shapes_match_model(self) -> "Profile":
        m = self.model
        if len(self.query_head_scores) != m.num_layers or len(self.kv_head_scores) != m.num_layers:
            raise ValueError(f"scores must have one row per layer ({m.num_layers})")
        if any(len(row) != m.num_attention_heads for row in self.query_head_scores):
            raise ValueError(f"query_head_scores rows must have {m.num_attention_heads} entries")
        if any(len(row) != m.num_key_value_heads for row in self.kv_head_scores):
            raise ValueError(f"kv_head_scores rows must have {m.num_key_value_heads} entries")
        if self.samples_kept > self.samples_total:
            raise ValueError("samples_kept cannot exceed samples_total")
        return self

    def save(self, path: str | Path) -> None:
        """Write atomically, so an interrupted profiler never leaves half a file behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"profile {path} does not exist. Make one with `rheads profile MODEL --out {path}`.")
        except (ValidationError, UnicodeDecodeError) as error:
            raise ProfileError(
                f"profile {path} is not a valid rheads profile (format {FORMAT_VERSION}): {error}. "
                "Re-create it with `rheads profile MODEL --out FILE`."
            ) from error

    @property
    def longest_context(self) -> int | None:
        """The longest context (tokens) the profile's samples measured; None when it does not say (imported)."""
        lengths = [s.context_length for s in self.samples] or self.method.params.get("lengths") or [None]
        return max(lengths, key=lambda n: n or 0)

    def coverage_warning(self, max_model_len: int) -> str | None:
        """What to tell a server whose requests may run past the lengths this profile was measured at."""
        longest = self.longest_context
        if longest is None or max_model_len <= longest:
            return None
        return (f"the profile for {self.model.name!r} was measured on contexts up to {longest} tokens, but "
                f"requests may be up to {max_model_len}: retrieval heads chosen at short lengths may miss at "
                f"long ones. Profile at the served length (`rheads profile {self.model.name} --lengths "
                f"...,{max_model_len} --device cuda`) or serve with --max-model-len {longest}.")

    def check_fits(self, identity: ModelIdentity) -> None:
        """Raise ProfileError naming every field where this profile and the model disagree."""
        mine = self.model
        diffs = [
            f"{key}: profile has {getattr(mine, key)}, model has {getattr(identity, key)}"
            for key in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "windows")
            if getattr(mine, key) != getattr(identity, key)
        ]
        if not diffs and mine.config_fingerprint and identity.config_fingerprint \
                and mine.config_fingerprint != identity.config_fingerprint:
            diffs = [
                f"{key}: profile has {mine.config_fields.get(key)}, model has {value}"
                for key, value in identity.config_fields.items() if mine.config_fields.get(key) != value
            ] or [f"config fingerprint {mine.config_fingerprint} != {identity.config_fingerprint}"]
        if diffs:
            raise ProfileError(
                f"the profile for {mine.name!r} does not fit the model {identity.name!r}: "
                + "; ".join(diffs)
                + f". Make a profile for this model with `rheads profile {identity.name} --out FILE`"
                " and pass it with --profile FILE."
            )


def aggregate_kv_scores(query_scores: list[list[float]], num_kv_heads: int,
                        how: KvAggregate = "max") -> list[list[float]]:
    """Score each KV head from its GQA group of query heads (consecutive query heads share a KV head)."""
    out = []
    for row in query_scores:
        group = len(row) // num_kv_heads
        chunks = [row[k * group:(k + 1) * group] for k in range(num_kv_heads)]
        out.append([max(c) if how == "max" else sum(c) / len(c) for c in chunks])
    return out


def profile_dirs() -> list[Path]:
    """Where shipped profiles are looked up: $RHEADS_PROFILES, the checkout's profiles/, ./profiles."""
    import os

    dirs = [Path(p) for p in os.environ.get("RHEADS_PROFILES", "").split(os.pathsep) if p]
    return dirs + [Path(__file__).resolve().parents[2] / "profiles", Path.cwd() / "profiles"]


def find_profile(model_name: str) -> Path:
    """The shipped profile for a model (by Hugging Face id or its last part), or a ProfileError saying how to make one."""
    candidates = [f"{model_name}.json", f"{model_name.split('/')[-1]}.json"]
    for directory in profile_dirs():
        for name in candidates:
            if (directory / name).is_file():
                return directory / name
    raise ProfileError(
        f"no shipped profile for {model_name!r} (looked in {', '.join(str(d) for d in profile_dirs())}). "
        f"Make one with `rheads profile {model_name} --out profiles/{model_name.split('/')[-1]}.json`, "
        "or serve with --budget 1.0 --profile none for an ordinary full cache."
    )


def synthetic_profile(identity: ModelIdentity, seed: int = 0) -> Profile:
    """Random scores for a model that has no real profile (random weights at a real shape).

    Only for speed and memory benchmarks: those depend on how many KV heads keep a full cache, not on
    which. The method name says so, so nobody mistakes it for a measured profile.
    """
    rng = random.Random(seed)
    query = [[round(rng.random(), 4) for _ in range(identity.num_attention_heads)] for _ in range(identity.num_layers)]
    return Profile(model=identity, method=ProfileMethod(name="synthetic_random", params={"seed": seed}),
                   samples_total=0, samples_kept=0, query_head_scores=query,
                   kv_head_scores=aggregate_kv_scores(query, identity.num_key_value_heads, how="max"))
