"""Importers: turn published head scores into rheads profiles, so large models need no profiling run.

Two formats are read: the per-head retrieval scores of Wu et al. (nightdessert/Retrieval_Head,
`head_score/<model>.json`) and DuoAttention's learned per-KV-head gates (mit-han-lab/duo-attention,
`<model>/full_attention_heads.tsv`). The files name their model only by file or folder name and carry
no config, so the model's shape comes from `KNOWN_MODELS` (the real public configs) and the file is
checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .profile import ModelIdentity, Profile, ProfileError, ProfileMethod, aggregate_kv_scores

DECIMALS = 4  # scores are rounded in the JSON: keeps shipped profiles small, far finer than any cut-off
DUO_CONFIG_KEYS = (
    "sink_size", "recent_size", "dataset_name", "dataset_format", "lr", "num_steps", "reg_weight",
    "max_length", "context_length_min", "context_length_max", "num_passkeys", "supervision",
    "streaming_attn_implementation",
)


class KnownModel(NamedTuple):
    """Hugging Face id and attention shape of a model with published scores."""

    hf_id: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128


_LLAMA3_8B = ("LlamaForCausalLM", 32, 32, 8)
_MISTRAL_7B = ("MistralForCausalLM", 32, 32, 8)

# Key: the published file's model name (head_score/<key>.json or duo_attention/<key>/).
KNOWN_MODELS: dict[str, KnownModel] = {
    # Retrieval_Head head_score/*.json
    "llama-2-7b-80k": KnownModel("yaofu/llama-2-7b-80k", "LlamaForCausalLM", 32, 32, 32),
    "llama-2-13b-64k": KnownModel("yaofu/llama-2-13b-64k", "LlamaForCausalLM", 40, 40, 40),
    "Yi-6B-200K": KnownModel("01-ai/Yi-6B-200K", "LlamaForCausalLM", 32, 32, 4),
    "Mistral-7B-v0.2-hf": KnownModel("mistral-community/Mistral-7B-v0.2", *_MISTRAL_7B),
    "Mixtral-8x7B-v0.1": KnownModel("mistralai/Mixtral-8x7B-v0.1", "MixtralForCausalLM", 32, 32, 8),
    "Qwen1.5-14B": KnownModel("Qwen/Qwen1.5-14B", "Qwen2ForCausalLM", 40, 40, 40),
    "Qwen1.5-14B-Chat": KnownModel("Qwen/Qwen1.5-14B-Chat", "Qwen2ForCausalLM", 40, 40, 40),
    # DuoAttention attn_patterns/<model>/full_attention_heads.tsv
    "Llama-2-7B-32K-Instruct": KnownModel(
        "togethercomputer/Llama-2-7B-32K-Instruct", "LlamaForCausalLM", 32, 32, 32),
    "Llama-3-8B-Instruct-Gradient-1048k": KnownModel(
        "gradientai/Llama-3-8B-Instruct-Gradient-1048k", *_LLAMA3_8B),
    "Llama-3-8B-Instruct-Gradient-4194k": KnownModel(
        "gradientai/Llama-3-8B-Instruct-Gradient-4194k", *_LLAMA3_8B),
    "Meta-Llama-3.1-8B-Instruct": KnownModel("meta-llama/Llama-3.1-8B-Instruct", *_LLAMA3_8B),
    "Mistral-7B-Instruct-v0.2": KnownModel("mistralai/Mistral-7B-Instruct-v0.2", *_MISTRAL_7B),
    "Mistral-7B-Instruct-v0.3": KnownModel("mistralai/Mistral-7B-Instruct-v0.3", *_MISTRAL_7B),
}


def find_known(name: str) -> KnownModel | None:
    """The table entry for a published name or a Hugging Face id (case-insensitive)."""
    name = name.lower()
    for key, known in KNOWN_MODELS.items():
        if name in (key.lower(), known.hf_id.lower()):
            return known
    return None


def default_profile_path(hf_id: str) -> Path:
    """Where a model's shipped profile lives: profiles/<org>/<name>.json, found by its Hugging Face id."""
    return Path("profiles") / f"{hf_id}.json"


def _round(x: float) -> float:
    return round(x, DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _identity(source_name: str, model_name: str | None, layers: int, heads: int | None,
              kv_heads: int | None, path: Path) -> ModelIdentity:
    """Identity from the table (model_name, then the file's name) checked against the file's shape.

    `heads`/`kv_heads` are what the file shows (None where the format does not say). Without a table
    entry the shape is taken from the file, which only works when model_name was given; head_dim is
    then assumed to be 128 (no file says; every published model has it).
    """
    known = find_known(model_name) if model_name else None
    known = known or find_known(source_name)
    if known is None:
        if model_name is None:
            raise ProfileError(
                f"{path}: unknown model {source_name!r}, so its shape cannot be checked. Pass its Hugging "
                f"Face id with `rheads profile import ... --model ORG/NAME`. Known: {', '.join(KNOWN_MODELS)}."
            )
        heads = heads or kv_heads
        return ModelIdentity(  # head_dim is not in the files: 128, as in every published model
            name=model_name, architecture="unknown", num_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads, head_dim=128)
    found = {"num_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    diffs = [f"{key}: file has {value}, {known.hf_id} has {getattr(known, key)}"
             for key, value in found.items() if value is not None and value != getattr(known, key)]
    if diffs:
        raise ProfileError(f"{path} does not fit {known.hf_id}: {'; '.join(diffs)}. "
                           "Pass the right model with --model ORG/NAME.")
    return ModelIdentity(
        name=model_name or known.hf_id, architecture=known.architecture, num_layers=known.num_layers,
        num_attention_heads=known.num_attention_heads, num_key_value_heads=known.num_key_value_heads,
        head_dim=known.head_dim)


def import_retrieval_head(path: Path, model_name: str | None = None) -> Profile:
    """Profile from Retrieval_Head's head_score/<model>.json ("layer-head" -> per-sample scores).

    A head's score is the mean of its list, as in the paper. The model is the file's stem unless
    `model_name` (a Hugging Face id) is given. For a model not in KNOWN_MODELS, layers and query heads
    come from the keys and the KV heads are taken equal to the query heads (the file cannot say).
    """
    path = Path(path)
    try:
        raw: dict[str, list[float]] = json.loads(path.read_text())
        cells = {tuple(int(i) for i in key.split("-")): values for key, values in raw.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise ProfileError(f"{path} is not a Retrieval_Head head_score file: {error}") from error
    if not cells or any(len(key) != 2 for key in cells):
        raise ProfileError(f"{path}: expected keys 'layer-head'")
    layers = max(layer for layer, _ in cells) + 1
    heads = max(head for _, head in cells) + 1
    if len(cells) != layers * heads:
        raise ProfileError(f"{path}: {len(cells)} heads, not a full {layers} x {heads} grid")
    lengths = {len(values) for values in cells.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ProfileError(f"{path}: heads have different or empty sample counts {sorted(lengths)}")
    identity = _identity(path.stem, model_name, layers, heads, None, path)
    query = [[_round(sum(cells[layer, head]) / len(cells[layer, head])) for head in range(heads)]
             for layer in range(layers)]
    samples = lengths.pop()
    return Profile(
        model=identity,
        method=ProfileMethod(name="import_retrieval_head", kv_aggregate="max", params={
            "source": path.name, "upstream": "nightdessert/Retrieval_Head", "source_model": path.stem}),
        samples_total=samples, samples_kept=samples,
        query_head_scores=query,
        kv_head_scores=aggregate_kv_scores(query, identity.num_key_value_heads, how="max"),
    )


def import_duo_attention(path: Path, model_name: str | None = None) -> Profile:
    """Profile from DuoAttention's full_attention_heads.tsv (rows: layers, columns: KV-head gates).

    The gates are the KV-head scores; each query head gets its KV head's gate. The model is the tsv's
    folder name unless `model_name` is given. For a model not in KNOWN_MODELS the KV-head count comes
    from the columns and the query heads are taken equal to it (no GQA), since the file cannot say.
    Gates are clipped to [0, 1], their trained range (the files hold float noise down to -0.0015).
    The training config.json next to the tsv, if present, is recorded in the method's params.
    """
    path = Path(path)
    try:
        rows = [[float(x) for x in line.split()] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise ProfileError(f"{path} is not a DuoAttention full_attention_heads.tsv: {error}") from error
    widths = {len(row) for row in rows}
    if not rows or len(widths) != 1:
        raise ProfileError(f"{path}: expected one row per layer with the same number of KV heads each")
    source_name = path.parent.name
    identity = _identity(source_name, model_name, len(rows), None, widths.pop(), path)
    clipped = sum(not 0.0 <= x <= 1.0 for row in rows for x in row)
    kv = [[_round(min(max(x, 0.0), 1.0)) for x in row] for row in rows]
    params: dict[str, Any] = {"source": f"{source_name}/{path.name}", "upstream": "mit-han-lab/duo-attention",
                              "source_model": source_name, "gates_clipped": clipped}
    config_path = path.with_name("config.json")
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        params["training_config"] = {key: config[key] for key in DUO_CONFIG_KEYS if key in config}
    group = identity.group_size
    return Profile(
        model=identity,
        method=ProfileMethod(name="import_duo_attention", kv_aggregate="max", params=params),
        samples_total=0, samples_kept=0,
        query_head_scores=[[gate for gate in row for _ in range(group)] for row in kv],
        kv_head_scores=kv,
    )


IMPORTERS: dict[str, Callable[..., Profile]] = {
    "retrieval-head": import_retrieval_head,
    "duo-attention": import_duo_attention,
}
