"""The report: every model of a run evaluated per layer, side by side (`rlrefine evaluate`, `rlrefine report`).

Where it sits: above `rlrefine.evaluate` (the metrics of one model) and below the pipeline and the CLI.
`evaluate_checkpoint` evaluates one saved captioner on a split and writes ``metrics.{json,md,png}``,
TensorBoard scalars and, on the recipe's main split, the model card's metrics; it also writes
``captions_<split>.jsonl`` (one line per image: its id, the caption at every layer 0..K and, for shapes
data, the scene's objects). `report` evaluates the XE model and every fine-tuned variant (each of its
seeds) on `evaluate.split` and every `evaluate.extra_splits`, reusing an earlier evaluation while it is
still valid (`cached_evaluation`), and writes ``report/compare.{md,json,png}`` (and ``compare_<split>.*``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rlrefine.config import RecipeConfig
from rlrefine.evaluate import metrics_version

log = logging.getLogger(__name__)

__all__ = ["cached_evaluation", "evaluate_checkpoint", "report", "report_stage"]


def evaluate_checkpoint(cfg: RecipeConfig, model_dir: Path, name: str, out_dir: Path, reference_dir: Path | None = None,
                        split_name: str | None = None, timings: dict | None = None) -> dict:
    """Evaluate one saved captioner on a split (default: the recipe's evaluate.split); writes
    metrics.{json,md,png}, captions_<split>.jsonl and TensorBoard scalars into ``out_dir``.

    ``timings``, if given, receives ``setup_s`` (loading the model, data and rewards) and ``eval_s``
    (scoring the images), which the dry run projects to the full split."""
    from torch.utils.tensorboard import SummaryWriter

    from rewards.registry import build_reward
    from rlrefine.data.sources import load_splits
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.evaluate import evaluate_model, markdown_table, write_captions, write_report
    from rlrefine.models import RefinementCaptioner
    from rlrefine.trainers.model_card import set_card_metrics

    e = cfg.evaluate
    t0 = time.perf_counter()
    device = cfg.torch_device
    model = RefinementCaptioner.from_pretrained(model_dir, map_location=device).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    split_name = split_name or e.split
    splits = load_splits(cfg.data)
    if split_name not in splits:
        raise ValueError(f"evaluate: this data has no split '{split_name}' (it has {', '.join(splits)}); "
                         f"change evaluate.split / evaluate.extra_splits")
    split = splits[split_name]
    evaluator = build_reward(e.evaluator, cfg.reward_context("evaluate.evaluator", device, splits["train"]))
    extra = {k: build_reward(v, cfg.reward_context(f"evaluate.extra_rewards.{k}", device, splits["train"]))
             for k, v in e.extra_rewards.items()}
    reference = None
    if reference_dir is not None and e.kl_reference and Path(reference_dir).resolve() != Path(model_dir).resolve():
        reference = RefinementCaptioner.from_pretrained(reference_dir, map_location=device).eval()
    t1 = time.perf_counter()
    result = evaluate_model(model, tokenizer, split, evaluator, num_images=e.num_images, image_size=cfg.data.image_size,
                            max_len=cfg.finetune.max_len, schedule_kind=cfg.pretrain.schedule, schedule_eps=cfg.pretrain.schedule_eps,
                            weights_kind=cfg.pretrain.layer_weights, alpha=e.alpha, extra_rewards=extra, reference=reference,
                            java_metrics=e.java_metrics)
    if timings is not None:
        timings.update(setup_s=t1 - t0, eval_s=time.perf_counter() - t1)
    captions = result.pop("captions")
    result.update({"model": str(model_dir), "split": split_name, "metrics_version": metrics_version(),
                   "evaluate_config": e.model_dump(mode="json", exclude={"split", "extra_splits"})})
    writer = SummaryWriter(str(out_dir / "tb"))
    write_report(result, out_dir, name=name, writer=writer)
    writer.close()
    write_captions(captions, split, out_dir / f"captions_{split_name}.jsonl", cfg.data.image_size)
    if split_name == e.split:  # the card carries the main split's table
        set_card_metrics(model_dir, f"Split `{e.split}`, {result['num_images']} images, evaluator `{e.evaluator.kind}` "
                                    f"(full results: `{out_dir}/metrics.json`).\n\n" + markdown_table(result))
    return result


def cached_evaluation(cfg: RecipeConfig, model_dir: Path, out_dir: Path, split: str) -> dict | None:
    """A model's earlier evaluation in ``out_dir`` when it is still valid: written after the model's
    weights, of the same model on the same split with the same `evaluate` settings (so adding a variant
    or a seed re-evaluates only the new models) and the same metrics (`rlrefine.evaluate.metrics_version`).
    None otherwise."""
    metrics, weights = out_dir / "metrics.json", Path(model_dir) / "model.safetensors"
    if not metrics.is_file() or not weights.is_file() or metrics.stat().st_mtime <= weights.stat().st_mtime:
        return None
    result = json.loads(metrics.read_text())
    settings = cfg.evaluate.model_dump(mode="json", exclude={"split", "extra_splits"})
    if (result.get("split") != split or result.get("evaluate_config") != settings or Path(result.get("model", "")) != Path(model_dir)
            or result.get("metrics_version") != metrics_version()):
        return None
    log.info("report: reusing %s (newer than %s)", metrics, weights)
    return result


def report(cfg: RecipeConfig) -> str:
    """Evaluate XE and every fine-tuned variant (each of its seeds) on `evaluate.split` and every
    `evaluate.extra_splits`; write report/compare.{md,json,png} (and compare_<split>.* per extra split);
    return the Markdown of all tables. A variant with several seeds is reported as mean ± std."""
    from rlrefine.evaluate import aggregate_seeds, compare_table, plot_layers

    out = cfg.run_path / "report"
    xe_dir = cfg.run_path / "pretrain" / "model"
    models = {"XE": [xe_dir]}
    for name, sections in cfg.finetune_runs().items():
        models[name] = [cfg.run_path / section.output / "model" for section in sections]
    tables = []
    for split in [cfg.evaluate.split, *[s for s in cfg.evaluate.extra_splits if s != cfg.evaluate.split]]:
        main = split == cfg.evaluate.split
        results = {}
        for name, dirs in models.items():
            t0 = time.time()
            runs = []
            for s, model_dir in enumerate(dirs):
                sub = name + (f"_seed{s}" if s else "")
                sub_dir = out / (sub if main else f"{split}/{sub}")
                cached = cached_evaluation(cfg, model_dir, sub_dir, split)
                runs.append(cached if cached is not None else
                            evaluate_checkpoint(cfg, model_dir, sub, sub_dir, reference_dir=xe_dir, split_name=split))
            results[name] = aggregate_seeds(runs)
            log.info("evaluated %s on %s (%d model%s) in %.0f s", name, split, len(dirs), "s" * (len(dirs) > 1), time.time() - t0)
        stem = "compare" if main else f"compare_{split}"
        header = (f"### Split '{split}', {results['XE']['num_images']} images, K = {results['XE']['K']}; evaluator = "
                  f"{cfg.evaluate.evaluator.kind}; {cfg.compare.seeds} fine-tuning seed(s) per variant (mean ± sample std); "
                  f"G = graduality on text embeddings (1 = on schedule).\n\n")
        table = header + compare_table(results)
        (out / f"{stem}.json").write_text(json.dumps({k: {kk: v for kk, v in r.items() if kk != "examples"} for k, r in results.items()}, indent=1))
        plot_layers(results, out / f"{stem}.png")
        tables.append(table)
    text = "\n".join(tables)
    (out / "compare.md").write_text(text)
    return text


def report_stage(cfg: RecipeConfig, resume: bool = False, force: bool = False) -> None:
    """The report, redone whenever the set of compared models changed (e.g. a variant or a seed was added)."""
    done = cfg.run_path / "report" / "compare.json"
    wanted = {"XE", *cfg.finetune_runs()}
    if done.is_file() and not force:
        old = json.loads(done.read_text())
        if set(old) == wanted and all(old[k].get("seeds", 1) == (1 if k == "XE" else cfg.compare.seeds) for k in old):
            log.info("report: %s already compares %s, skipped (--force redoes it)", done, ", ".join(sorted(wanted)))
            return
    print("\n" + report(cfg))
