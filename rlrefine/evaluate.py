"""Per-layer evaluation of a refinement captioner and the graduality score (docs/design.md, "The math").

For every layer k = 0..K (0 is the caption decoded from the noise z_0), every registered layer metric
(`LAYER_METRICS`, in order): BLEU-4, ROUGE-L, CIDEr-D (METEOR / SPICE when Java and their jars are
present, else reported as unavailable), the evaluator's score (and any extra rewards configured), the
Vendi diversity of the captions (on the evaluator's text embeddings), mean length, vocabulary size,
repeated-n-gram rate, and on the shapes data object recall (all images, and images with 2+ objects),
hallucination rate, relation accuracy, grammaticality and the counts behind the rates
(`rlrefine.metrics.grounding`). Then the progress curves π_k on latents and on the evaluator's text
embeddings of the decoded captions against the ideal 1 − s(k), the graduality G, the layer score P and
the refinement score RS = (1 − α)·perf_K + α·G. With a reference model, the KL of the final layer to it
(sampled).

Adding a metric: a function ``fn(layer: LayerData) -> {name: value}`` registered with
`register_layer_metric` (here, or in the module that defines it); `METRICS_VERSION` follows the
registered metrics and their versions, so the report re-evaluates models instead of reusing results
computed without it. `write_report` writes `metrics.json`, `metrics.md` (layers × metrics) and PNG plots
and logs the same to TensorBoard; `compare_table` renders several models side by side.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from rlrefine.losses import layer_weights, schedule
from rlrefine.metrics import caption_metrics, graduality, layer_score, progress_curve, refinement_score, text_stats
from rlrefine.metrics.diversity import vendi_score
from rlrefine.models import RefinementCaptioner
from rlrefine.data.batches import eval_z0_seeds, load_images

log = logging.getLogger(__name__)

HEADLINE = ["evaluator", "CIDEr-D", "object_recall_multi", "hallucination_rate", "grammaticality", "vendi", "mean_length",
            "BLEU-4", "ROUGE-L"]  # the plots show the first of these that exist (up to 7)


@torch.no_grad()
def decode_all_layers(model: RefinementCaptioner, tokenizer, split, index: np.ndarray, image_size: int, max_len: int,
                      batch_size: int = 100) -> tuple[list[list[str]], torch.Tensor]:
    """Greedy captions at every layer 0..K and the latents -> (captions [N][K+1], Z [N, K+1, M·d])."""
    device = next(model.parameters()).device
    K = model.config.num_refine_layers
    captions: list[list[str]] = []
    latents = []
    for start in tqdm(range(0, len(index), batch_size), desc="decode", leave=False):
        idx = index[start:start + batch_size]
        pixels = model.encoder.preprocess(load_images(split, idx, image_size).to(device))
        seeds = eval_z0_seeds(idx).to(device)
        gen = model.generate(pixels, seeds, list(range(K + 1)), method="greedy", num_candidates=1, max_len=max_len)
        captions.extend([[layer[0] for layer in img] for img in tokenizer.decode_batch(gen.tokens.cpu())])
        latents.append(model.latents(pixels, seeds).flatten(2).float().cpu())
    return captions, torch.cat(latents)


@torch.no_grad()
def sampled_kl(model: RefinementCaptioner, reference: RefinementCaptioner, split, index: np.ndarray, image_size: int,
               max_len: int, n: int = 4, batch_size: int = 50) -> float:
    """KL(π ‖ π_ref) of the final layer, estimated as mean(log π − log π_ref) over captions sampled from π."""
    device = next(model.parameters()).device
    K = model.config.num_refine_layers
    total, count = 0.0, 0
    gen_rng = torch.Generator().manual_seed(1234)
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        pixels = model.encoder.preprocess(load_images(split, idx, image_size).to(device))
        seeds = eval_z0_seeds(idx).to(device)
        gen = model.generate(pixels, seeds, [K], method="sample", num_candidates=n, max_len=max_len, generator=gen_rng)
        ref = reference.sequence_logprobs(pixels, seeds, [K], gen.tokens)
        pol = model.sequence_logprobs(pixels, seeds, [K], gen.tokens)
        total += float((pol - ref).sum())
        count += pol.numel()
    return total / max(count, 1)


@dataclass
class LayerData:
    """What a layer metric reads: the captions decoded at one layer of the first N images of a split."""

    layer: int
    captions: list[str]  # [N]
    index: np.ndarray  # [N] rows of the split
    references: dict[int, list[str]]  # row -> reference captions
    images: torch.Tensor  # [N, H, W, 3] uint8
    scenes: list | None  # [N] shapes scenes, else None
    evaluator: Any  # the evaluator reward (or None)
    extra_rewards: dict[str, Any]
    text_emb: torch.Tensor | None  # [N, D] the evaluator's text embeddings of the captions
    java: bool  # METEOR / SPICE where Java is present


LAYER_METRICS: dict[str, tuple[Callable[[LayerData], dict], int]] = {}
"""name -> (metric function, version): every per-layer metric of an evaluation, in the order they are computed."""


def register_layer_metric(name: str, version: int = 1) -> Callable:
    """Decorator: ``fn(layer: LayerData) -> {metric: value}`` becomes part of every evaluation (bump ``version``
    when its definition changes, so earlier evaluations are not reused)."""
    def wrap(fn: Callable[[LayerData], dict]) -> Callable[[LayerData], dict]:
        LAYER_METRICS[name] = (fn, version)
        return fn
    return wrap


@register_layer_metric("captions")
def _caption_metrics(x: LayerData) -> dict:
    m = caption_metrics(x.references, {int(i): [c] for i, c in zip(x.index, x.captions)}, java=x.java)
    return {k: m.get(k) for k in ("BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "SPICE")}


@register_layer_metric("rewards")
def _reward_scores(x: LayerData) -> dict:
    row = {}
    if x.evaluator is not None:
        row["evaluator"] = float(x.evaluator(x.images, x.captions).mean())
    for name, reward in x.extra_rewards.items():
        row[name] = float(reward(x.images, x.captions, references=[x.references[int(i)] for i in x.index]).mean())
    return row


@register_layer_metric("vendi")
def _vendi(x: LayerData) -> dict:
    return {} if x.text_emb is None else {"vendi": vendi_score(x.text_emb)}


@register_layer_metric("text_stats")
def _text_stats(x: LayerData) -> dict:
    return text_stats(x.captions)


@register_layer_metric("grounding", version=3)
def _grounding(x: LayerData) -> dict:
    """Shapes data: grounded recall / precision / relations against the scenes, grammaticality, and the counts
    behind the rates (a rate over an empty count is 0.0; the count tells it from a real zero)."""
    if x.scenes is None:
        return {}
    from rlrefine.metrics.grounding import grammaticality, grounding_scores

    g = grounding_scores(x.captions, x.scenes)
    row = {k: g[k] for k in ("object_accuracy", "object_recall", "object_recall_multi", "hallucination_rate",
                             "relation_accuracy", "relation_precision", "relation_recall_multi")}
    row.update({"grounded_precision": g["precision"], "grammaticality": grammaticality(x.captions)})
    row.update({k: g[k] for k in ("num_captions", "num_objects", "num_mentions", "num_relations", "num_multi_images")})
    return row


def metrics_version() -> str:
    """The version of an evaluation: the evaluation code's, and every registered layer metric with its own."""
    return "3:" + ",".join(f"{name}@{version}" for name, (_, version) in LAYER_METRICS.items())


def evaluate_model(model: RefinementCaptioner, tokenizer, split, evaluator, *, num_images: int, image_size: int,
                   max_len: int, schedule_kind: str = "linear", schedule_eps: float = 0.01, weights_kind: str = "linear",
                   alpha: float = 0.5, extra_rewards: dict | None = None, reference: RefinementCaptioner | None = None,
                   java_metrics: bool = True) -> dict:
    """Every metric of the module docstring for one model on (the first `num_images` captioning examples of) a
    split. ``captions`` holds each image's caption at every layer ([N][K+1]) and ``caption_index`` its row."""
    model.eval()
    K = model.config.num_refine_layers
    is_label = np.asarray(split.is_label, dtype=bool)
    index = np.flatnonzero(~is_label)[:num_images]
    captions, Z = decode_all_layers(model, tokenizer, split, index, image_size, max_len)
    refs = {int(i): list(split.captions[i]) for i in index}
    images = load_images(split, index, image_size)
    scenes = None if split.scenes is None else [split.scenes[i] for i in index]

    per_layer = []
    text_emb = []
    for k in range(K + 1):
        caps = [c[k] for c in captions]
        if evaluator is not None:
            text_emb.append(evaluator.embed_texts(caps).float().cpu())
        layer = LayerData(k, caps, index, refs, images, scenes, evaluator, extra_rewards or {},
                          text_emb[-1] if text_emb else None, java_metrics)
        row: dict = {"layer": k}
        for fn, _ in LAYER_METRICS.values():
            row.update(fn(layer))
        per_layer.append(row)

    out = {"num_images": int(len(index)), "K": K, "layers": per_layer}
    out.update(_graduality(Z, text_emb, per_layer, schedule_kind, schedule_eps, weights_kind, alpha, K))
    if reference is not None:
        out["kl_ref"] = sampled_kl(model, reference, split, index[: min(200, len(index))], image_size, max_len)
    out["final"] = per_layer[-1]
    out["examples"] = [{"image": int(i), "objects": None if split.scenes is None else len(split.scenes[i].objects),
                        "references": refs[int(i)][:2], "layers": captions[j]} for j, i in enumerate(index[:8])]
    out["captions"] = {"index": [int(i) for i in index], "layers": captions}
    return out


def _graduality(Z: torch.Tensor, text_emb: list[torch.Tensor], per_layer: list[dict], schedule_kind: str,
                schedule_eps: float, weights_kind: str, alpha: float, K: int) -> dict:
    """Progress curves (latents; the evaluator's text embeddings), G, and P and RS on the evaluator's score."""
    sched = schedule(schedule_kind, K, schedule_eps)
    ideal = (1 - sched).tolist()
    progress_latent = progress_curve(Z).tolist()  # [N, K+1, M·d] -> [K+1]
    out = {"ideal_progress": ideal, "progress_latent": progress_latent, "G_latent": graduality(progress_latent, sched)}
    progress_text = None
    if text_emb:
        text_stack = torch.stack(text_emb, dim=1)  # [N, K+1, D]
        try:
            progress_text = progress_curve(text_stack, distance="cosine").tolist()
        except ValueError:  # every image's layer-0 caption equals its layer-K caption: no text progress to measure
            log.warning("text progress undefined (layer-0 and layer-K captions coincide for every image); G uses latents")
    G = graduality(progress_text, sched) if progress_text is not None else out["G_latent"]
    out.update({"progress_text": progress_text, "G_text": G if progress_text is not None else None, "G": G})
    if progress_text is not None:  # the per-image mean, unstable where a layer-0 caption lies near the final one
        mean_curve = progress_curve(text_stack, distance="cosine", estimator="mean").tolist()
        out.update({"progress_text_mean": mean_curve, "G_text_mean": graduality(mean_curve, sched)})
    if text_emb:
        perf = torch.tensor([r["evaluator"] for r in per_layer[1:]])
        out.update({"P": layer_score(perf, layer_weights(weights_kind, K)), "RS": refinement_score(float(perf[-1]), G, alpha),
                    "alpha": alpha})
    return out


def write_captions(captions: dict, split, path: Path, image_size: int) -> Path:
    """``captions_<split>.jsonl``: one line per image, ``image_id``, ``captions`` (the caption at every layer
    0..K) and, for shapes data, ``objects`` (each with ``colour``, ``shape``, ``size``, ``x``, ``y``: the
    centre in pixels, y growing downward). Plain data for a person to read, not a summary."""
    lines = []
    for i, caps in zip(captions["index"], captions["layers"]):
        row: dict = {"image_id": split.image_ids[i], "captions": caps}
        if split.scenes is not None:
            row["objects"] = [{"colour": o.colour, "shape": o.shape, "size": o.size, "x": int(o.x), "y": int(o.y)}
                              for o in split.scenes[i].objects]
        lines.append(json.dumps(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------- reporting
def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.3f} ± {v['std']:.3f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _mean(v):
    """The value of a metric, or its mean over seeds."""
    return v["mean"] if isinstance(v, dict) and "mean" in v else v


SEED_KEYS = ("G", "G_latent", "G_text", "G_text_mean", "P", "RS", "kl_ref")


def aggregate_seeds(results: list[dict]) -> dict:
    """One model's evaluation over several fine-tuning seeds: every scalar of ``final`` and ``SEED_KEYS``
    becomes ``{"mean", "std", "n"}`` (std: the sample standard deviation, ddof = 1); ``layers`` and the
    progress curves hold per-layer means and ``layers_std`` the per-layer stds (for the plots); ``per_seed``
    keeps each run's final block. A single result is returned unchanged."""
    if len(results) == 1:
        return results[0]

    def stat(values):
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1)), "n": int(a.size)}

    first = results[0]
    out = {k: v for k, v in first.items() if k not in ("layers", "final", "examples", *SEED_KEYS)}
    numeric = lambda row, k: isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)  # noqa: E731
    out["final"] = {k: stat([r["final"][k] for r in results]) for k in first["final"] if numeric(first["final"], k) and k != "layer"}
    for k in SEED_KEYS:
        if all(r.get(k) is not None for r in results):
            out[k] = stat([r[k] for r in results])
    out["layers"], out["layers_std"] = [], []
    for k, row in enumerate(first["layers"]):
        keys = [m for m in row if numeric(row, m) and all(numeric(r["layers"][k], m) for r in results)]
        out["layers"].append({m: float(np.mean([r["layers"][k][m] for r in results])) for m in keys} | {"layer": k})
        out["layers_std"].append({m: float(np.std([r["layers"][k][m] for r in results], ddof=1)) for m in keys} | {"layer": k})
    for curve in ("progress_text", "progress_text_mean", "progress_latent"):
        if all(r.get(curve) is not None for r in results):
            out[curve] = np.mean([r[curve] for r in results], axis=0).tolist()
    out["seeds"] = len(results)
    out["per_seed"] = [{"final": r["final"], **{k: r.get(k) for k in SEED_KEYS}} for r in results]
    out["examples"] = first.get("examples", [])
    return out


def markdown_table(result: dict) -> str:
    """Layers × metrics table (metrics that are None everywhere, e.g. METEOR without Java, say n/a)."""
    rows = result["layers"]
    keys = [k for k in ["CIDEr-D", "BLEU-4", "ROUGE-L", "METEOR", "SPICE", "evaluator", "object_accuracy",
                        "grounded_precision", "relation_accuracy", "mean_length", "vocab_size", "repeated_ngram_rate"]
            if any(k in r for r in rows)]
    keys += [k for k in rows[0] if k not in keys and k != "layer" and not isinstance(rows[0][k], (list, dict))]
    ideal = result["ideal_progress"]
    prog = result.get("progress_text") or result["progress_latent"]
    lines = ["| layer | " + " | ".join(keys) + " | progress | ideal |", "|" + "---|" * (len(keys) + 3)]
    for r, p, s in zip(rows, prog, ideal):
        lines.append(f"| {r['layer']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + f" | {p:.3f} | {s:.3f} |")
    summary = f"\nG = {result['G']:.3f} (latent G = {result['G_latent']:.3f})"
    if "P" in result:
        summary += f", P = {result['P']:.3f}, RS = {result['RS']:.3f} (α = {result['alpha']})"
    if "kl_ref" in result:
        summary += f", KL to reference = {result['kl_ref']:.3f} nats"
    return "\n".join(lines) + "\n" + summary + "\n"


def plot_layers(results: dict[str, dict], path: Path, metrics: list[str] | None = None) -> Path:
    """One panel per metric, metric against the layer, one line per model; plus progress vs the ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    metrics = metrics or [m for m in HEADLINE if m in first["layers"][0]][:7]
    n_panels = len(metrics) + 1
    cols = 3
    rows = (n_panels + cols - 1) // cols
    # The empty panels of the last row zoom into layers 1..K of the headline scores: layer 0 (noise)
    # sets the y-range of the full panels and hides the differences between models.
    zooms = [m for m in ("evaluator", "object_recall_multi", "CIDEr-D") if m in metrics][: rows * cols - n_panels]
    if len(results) < 2 or first["K"] < 2:
        zooms = []
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    panels = [(m, 0) for m in metrics] + [("progress", 0)] + [(m, 1) for m in zooms]
    for ax, (metric, start) in zip(axes.flat, panels):
        if metric == "progress":
            continue
        for name, res in results.items():
            rows_k = [r for r in res["layers"] if r["layer"] >= start]
            xs = [r["layer"] for r in rows_k]
            ys = np.array([r.get(metric) if r.get(metric) is not None else np.nan for r in rows_k], dtype=float)
            label = name + (f" ({res['seeds']} seeds, ± std)" if res.get("seeds", 1) > 1 else "")
            line, = ax.plot(xs, ys, marker="o", label=label)
            if res.get("layers_std"):
                sd = np.array([r.get(metric, np.nan) for r in res["layers_std"] if r["layer"] >= start], dtype=float)
                ax.fill_between(xs, ys - sd, ys + sd, color=line.get_color(), alpha=0.2)
        ax.set_title(f"{metric} per refinement layer" if start == 0 else f"{metric}, layers 1..K (zoom)")
        ax.set_xlabel("layer k (0 = noise z_0)" if start == 0 else "layer k")
        if start:
            ax.set_xticks(range(start, first["K"] + 1))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[len(metrics)]
    ks = list(range(first["K"] + 1))
    ax.plot(ks, first["ideal_progress"], "k--", label="ideal 1 − s(k)")
    for name, res in results.items():
        curve = res.get("progress_text") or res["progress_latent"]
        ax.plot(ks, curve, marker="o", label=f"{name} (G={_fmt(res['G'])})")
    ax.set_title("progress vs ideal schedule (text embeddings)")
    ax.set_xlabel("layer k")
    ax.set_ylabel("progress π_k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for extra in list(axes.flat)[len(panels):]:
        extra.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: Path, name: str = "model", writer=None) -> None:
    """metrics.json, metrics.md and metrics.png in out_dir; scalars, text and the figure to TensorBoard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    (out_dir / "metrics.md").write_text(f"# {name}\n\n" + markdown_table(result))
    png = plot_layers({name: result}, out_dir / "metrics.png")
    if writer is not None:
        for r in result["layers"]:
            for k, v in r.items():
                if isinstance(v, (int, float)) and k != "layer":
                    writer.add_scalar(f"eval/{k}", v, r["layer"])
        for k in ("G", "G_latent", "P", "RS", "kl_ref"):
            if result.get(k) is not None:
                writer.add_scalar(f"eval/{k}", result[k], 0)
        writer.add_text("eval/table", markdown_table(result), 0)
        from PIL import Image

        writer.add_image("eval/plots", np.asarray(Image.open(png).convert("RGB")), 0, dataformats="HWC")
        writer.flush()


COMPARE_COLUMNS = ["evaluator", "CIDEr-D", "BLEU-4", "object_recall", "object_recall_multi", "hallucination_rate",
                   "relation_recall_multi", "relation_precision", "num_relations", "grammaticality", "vendi", "mean_length",
                   "repeated_ngram_rate"]


def compare_table(results: dict[str, dict]) -> str:
    """Models side by side on the final layer (+ G, P, RS, KL); a model run with several seeds shows
    mean ± std (see `aggregate_seeds`)."""
    cols = [c for c in COMPARE_COLUMNS if any(c in r["final"] for r in results.values())]
    head = "| model | seeds | " + " | ".join(f"{c} (layer K)" for c in cols) + " | G | P | RS | KL to ref |"
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for name, r in results.items():
        cells = [str(r.get("seeds", 1))] + [_fmt(r["final"].get(c)) for c in cols]
        cells += [_fmt(r.get("G")), _fmt(r.get("P")), _fmt(r.get("RS")), _fmt(r.get("kl_ref"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
