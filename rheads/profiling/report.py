"""Reading a profile: sparsity figures, top heads and a layer x head heatmap.

The sparsity figures say how much KV cache the profile would save: only heads above the cut-off keep
a full cache, so the share above 0.1 / 0.5 is roughly the share of the cache that stays full. A hybrid
model's sliding-window layers have no choice to make (the model windows every head of them): their
scores are measured and shown, marked apart, and no budget counts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .profile import Profile

THRESHOLDS = (0.1, 0.5)


def _figures(rows: list[list[float]]) -> dict[str, Any]:
    scores = [x for row in rows for x in row]
    total = len(scores)
    out: dict[str, Any] = {"total": total}
    counts = {f"gt_{t}": sum(x > t for x in scores) for t in THRESHOLDS}
    counts["zero"] = sum(x == 0 for x in scores)
    for key, count in counts.items():
        out[f"count_{key}"] = count
        out[f"share_{key}"] = count / total if total else 0.0
    return out


def sparsity(profile: Profile) -> dict[str, dict[str, Any]]:
    """Counts and shares of query and KV heads scoring > 0.1, > 0.5 and exactly 0.

    Keys: "query" and "kv", each with total, count_gt_0.1, share_gt_0.1, count_gt_0.5, share_gt_0.5,
    count_zero, share_zero.
    """
    return {"query": _figures(profile.query_head_scores), "kv": _figures(profile.kv_head_scores)}


def top_heads(profile: Profile, n: int) -> list[tuple[int, int, float]]:
    """The n best query heads as (layer, head, score), best first; ties in layer, head order."""
    cells = [(layer, head, score) for layer, row in enumerate(profile.query_head_scores)
             for head, score in enumerate(row)]
    return sorted(cells, key=lambda c: (-c[2], c[0], c[1]))[:n]


def format_report(profile: Profile, top: int = 10) -> str:
    """A text block: model, method, samples, sparsity table and top query heads."""
    m, method = profile.model, profile.method
    source = method.params.get("source")
    samples = (f"{profile.samples_kept} kept of {profile.samples_total}" if profile.samples_total
               else "none (imported scores, no samples)")
    lines = [
        f"model    {m.name} ({m.architecture}, {m.num_layers} layers, {m.num_attention_heads} query heads, "
        f"{m.num_key_value_heads} KV heads)",
        f"method   {method.name} (KV aggregate: {method.kv_aggregate})" + (f", source {source}" if source else ""),
        f"samples  {samples}",
        *_layer_kinds(profile),
        "",
        f"{'heads':<8}{'total':>7}{'> 0.1':>16}{'> 0.5':>16}{'= 0':>16}",
    ]
    for label, fig in sparsity(profile).items():
        cells = [f"{fig['count_' + k]} ({fig['share_' + k]:.1%})" for k in ("gt_0.1", "gt_0.5", "zero")]
        cols = "".join(f"{cell:>16}" for cell in cells)
        lines.append(f"{label:<8}{fig['total']:>7}{cols}")
    lines += ["", f"top {top} query heads (layer-head score):"]
    lines += [f"  {layer}-{head} {score:.2f}" for layer, head, score in top_heads(profile, top)]
    return "\n".join(lines)


def sliding_layers(profile: Profile) -> dict[int, int]:
    """The profile's sliding-window layers and their windows (none for a profile of full layers only)."""
    return {layer: window for layer, window in enumerate(profile.model.windows) if window}


def _layer_kinds(profile: Profile) -> list[str]:
    sliding = sliding_layers(profile)
    if not sliding:
        return []
    windows = ", ".join(str(w) for w in sorted(set(sliding.values())))
    return [f"layers   {profile.model.num_layers - len(sliding)} full attention, {len(sliding)} sliding window "
            f"(window {windows}; layers {', '.join(map(str, sliding))}): budgets divide the full layers' KV heads"]


def write_heatmap(profile: Profile, png_path: str | Path) -> None:
    """Layer x query-head heatmap PNG, plus a KV-head panel when heads are grouped (GQA); a sliding-window
    layer's row is hatched over, its label marked `w`."""
    from matplotlib.patches import Patch
    from matplotlib.figure import Figure  # the object API renders with Agg and touches no global backend

    m, sliding = profile.model, sliding_layers(profile)
    panels = [(profile.query_head_scores, "query head")]
    if m.group_size > 1:
        panels.append((profile.kv_head_scores, f"KV head (group of {m.group_size} query heads)"))
    widths = [max(len(rows[0]), 4) for rows, _ in panels]
    vmax = max(1.0, max(x for rows, _ in panels for row in rows for x in row))
    fig = Figure(figsize=(max(6.0, 0.22 * sum(widths) + 2.5), max(4.0, 0.2 * m.num_layers + 1.8)),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    for ax, (rows, label) in zip(axes, panels):
        image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xlabel(label)
        ax.set_ylabel("layer" if ax is axes[0] else "")
        step_x = max(1, len(rows[0]) // 20)
        step_y = max(1, m.num_layers // 40)
        ax.set_xticks(range(0, len(rows[0]), step_x))
        ax.set_yticks(range(0, m.num_layers, step_y))
        ax.tick_params(labelsize=7)
        for layer in sliding:
            ax.axhspan(layer - 0.5, layer + 0.5, facecolor="lightgrey", alpha=0.7, hatch="///", edgecolor="dimgrey")
    if sliding:
        axes[0].set_yticklabels([f"{y} w" if y in sliding else str(y) for y in range(0, m.num_layers, step_y)])
        fig.legend(handles=[Patch(facecolor="lightgrey", hatch="///", edgecolor="dimgrey",
                                  label="sliding-window layer (w): no retrieval-head choice")],
                   loc="outside lower center", fontsize=7)
    samples = f"{profile.samples_kept} samples kept" if profile.samples_total else "imported, no samples"
    fig.suptitle(f"{m.name}: {profile.method.name} ({samples})", fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="score")
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
