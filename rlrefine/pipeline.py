"""The stages of a recipe and the order `rlrefine run` runs them in (DESIGN.md §6).

    train-evaluator -> pretrain -> distill-reward -> finetune (each `compare` variant) -> report

Each stage writes into the recipe's run_dir and has a marker file; `run` skips a stage whose marker
exists (unless forced). The report stage evaluates the XE model and every fine-tuned variant on the
test split and writes the side-by-side table `report/compare.md` (+ json, png).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlrefine.config import RecipeConfig

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    marker: str  # relative to run_dir; the stage is done when it exists
    run: Callable[[RecipeConfig, bool, bool], object]  # (cfg, resume, force)


def train_evaluator_stage(cfg: RecipeConfig, resume: bool = False, force: bool = False) -> dict:
    """`train-evaluator`: the learned CLIP-style evaluator on the recipe's data -> <run_dir>/evaluator."""
    import dataclasses

    from rewards.evaluator import train_evaluator
    from rlrefine.trainers.common import load_splits, make_accelerator

    acc = make_accelerator(cfg, "evaluator")
    acc.init_trackers("tb")
    splits = load_splits(cfg)
    train, val = splits["train"], splits["val"]
    salient = cfg.data.kind == "shapes" and cfg.data.shapes.references == "salient"
    if salient:  # the teacher learns from descriptions of every object, as PAC-S from curated data
        from rlrefine.data.shapes import complete_descriptions

        size = cfg.data.shapes.image_size
        train = dataclasses.replace(train, captions=complete_descriptions(train, size, seed=cfg.seed + 1))
        val = dataclasses.replace(val, captions=complete_descriptions(val, size, seed=cfg.seed + 2))
    pairs = None
    if cfg.data.kind == "shapes" and cfg.evaluator.preference_pairs:
        from rlrefine.data.shapes import DEFAULT_HELD_OUT, ordered_descriptions

        size = cfg.data.shapes.image_size
        pairs = lambda i, rng: ordered_descriptions(train.scenes[i], size, rng, exclude=DEFAULT_HELD_OUT)  # noqa: E731
    ecfg = dataclasses.replace(cfg.evaluator, device=str(acc.device))
    metrics = train_evaluator(ecfg, train, val, cfg.run_path / "evaluator", logger=acc, preference_pairs=pairs)
    if salient:
        metrics.update(_teacher_preferences(cfg, splits["val"], val.captions, acc.device))
    (cfg.run_path / "evaluator" / "report.json").write_text(json.dumps(metrics, indent=1))
    if acc.is_main_process:
        from rlrefine.trainers.model_card import scalars_table, write_model_card

        write_model_card(cfg.run_path / "evaluator", "Learned evaluator (teacher reward)",
                         "A CLIP-style dual encoder (open_clip classes) trained contrastively with hard negatives "
                         "(`rlrefine train-evaluator`); load it with `rewards.LearnedScore.from_dir`.", cfg, scalars_table(metrics))
    acc.end_training()
    log.info("evaluator: swap accuracy %.3f (colour %.3f, shape %.3f, relation %.3f), R@1 i2t %.3f, complete description "
             "above every partial reference %.3f, partial description above a misnamed object %.3f",
             *(metrics.get(k, float("nan")) for k in ("swap_acc", "swap_acc/colour", "swap_acc/shape", "swap_acc/relation",
                                                       "r1_i2t", "complete_over_partial", "partial_over_misnamed")))
    return metrics


def _teacher_preferences(cfg: RecipeConfig, split, descriptions: list[list[str]], device) -> dict[str, float]:
    """On held-out images, how often the trained evaluator scores
    * ``complete_over_partial``: an image's complete description above every one of its references that
      leaves an object out (the gap reward fine-tuning can exploit), and
    * ``partial_over_misnamed``: a correct partial description above the same plus one misnamed object
      (`rlrefine.data.shapes.misnamed_pair`; at 0.5 the reward pays as much for a wrong object as it
      costs, and fine-tuning hallucinates)."""
    import random

    import torch

    from rewards import LearnedScore
    from rewards.evaluator import preference_rate
    from rlrefine.data.shapes import DEFAULT_HELD_OUT, misnamed_pair, parse_caption

    reward = LearnedScore.from_dir(cfg.run_path / "evaluator", device=device)
    images = torch.from_numpy(split.images)
    n = min(len(split), cfg.evaluator.eval_max_images)
    partial = [[] if split.is_label[i] else
               [c for c in split.captions[i] if len(set(parse_caption(c).mentions)) < len(split.scenes[i].objects)]
               for i in range(n)]
    result = preference_rate(reward, images[:n], [d[0] for d in descriptions[:n]], partial)
    rng, size = random.Random(cfg.seed), cfg.data.shapes.image_size
    rows = [i for i in range(n) if not split.is_label[i]]
    pairs = [misnamed_pair(split.scenes[i], size, rng, exclude=DEFAULT_HELD_OUT) for i in rows]
    misnamed = preference_rate(reward, images[rows], [b for b, _ in pairs], [[w] for _, w in pairs])
    return {"complete_over_partial": result["rate"], "complete_over_partial_images": result["images"],
            "partial_over_misnamed": misnamed["rate"], "partial_over_misnamed_images": misnamed["images"]}


def captioner_candidates(cfg: RecipeConfig, split, index, beams: int, sampled: bool = True) -> list[tuple[int, int, str]]:
    """(image index, layer, caption) triples: the pretrained captioner's ``beams`` beam candidates (and,
    with ``sampled``, one sampled caption) at every layer for the images ``index`` of ``split``, each
    distinct non-empty caption of an image and layer once; z_0 from the evaluation seeds."""
    import numpy as np
    import torch

    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.models import RefinementCaptioner
    from rlrefine.trainers.common import eval_z0_seeds, load_images

    model_dir = cfg.run_path / "pretrain" / "model"
    model = RefinementCaptioner.from_pretrained(model_dir).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    K = model.config.num_refine_layers
    index = np.asarray(index, dtype=np.int64)
    g = torch.Generator().manual_seed(cfg.seed)
    methods = (("beam", beams), ("sample", 1)) if sampled else (("beam", beams),)
    out: list[tuple[int, int, str]] = []
    with torch.no_grad():
        for start in range(0, len(index), 64):
            idx = index[start:start + 64]
            pixels = model.encoder.preprocess(load_images(split, idx, cfg.data.image_size))
            seeds = eval_z0_seeds(idx, seed=cfg.seed)
            for method, n in methods:
                gen = model.generate(pixels, seeds, list(range(K + 1)), method=method, num_candidates=n,
                                     max_len=cfg.data.max_caption_len, generator=g)
                for i, per_img in zip(idx, tokenizer.decode_batch(gen.tokens)):
                    out.extend((int(i), layer, c) for layer, caps in enumerate(per_img)
                               for c in dict.fromkeys(caps) if c.strip())
    return out


def distill_stage(cfg: RecipeConfig, resume: bool = False, force: bool = False) -> dict:
    """`distill-reward`: a compact student imitating the teacher reward -> <run_dir>/distill."""
    import dataclasses

    from rewards.distill import distill_reward
    from rlrefine.trainers.common import build_reward, load_splits, make_accelerator

    d = cfg.distill
    acc = make_accelerator(cfg, "distill")
    acc.init_trackers("tb")
    splits = load_splits(cfg)
    teacher = build_reward(d.teacher, cfg, acc.device, name="distill.teacher")
    candidates = None
    if d.candidate_images > 0 and (cfg.run_path / "pretrain" / "model").is_dir():
        import numpy as np

        split = splits["train"]
        index = np.flatnonzero(~np.asarray(split.is_label, dtype=bool))[:d.candidate_images]  # captioned images
        candidates = [(i, c) for i, _, c in captioner_candidates(cfg, split, index, d.candidate_beams)]
        log.info("distill: %d captioner candidate pairs from every layer", len(candidates))
    scfg = dataclasses.replace(d.student, device=str(acc.device))
    metrics = distill_reward(scfg, teacher, splits["train"], cfg.run_path / "distill", candidates=candidates, logger=acc)
    (cfg.run_path / "distill" / "report.json").write_text(json.dumps(metrics, indent=1))
    if acc.is_main_process:
        from rlrefine.trainers.model_card import scalars_table, write_model_card

        write_model_card(cfg.run_path / "distill", f"Distilled reward (student of the {d.teacher.kind} teacher)",
                         "A compact student that imitates the teacher reward (`rlrefine distill-reward`); load it with "
                         "`rewards.DistilledScore.from_dir`. Held-out fidelity to the teacher below.", cfg, scalars_table(metrics))
    acc.end_training()
    log.info("distilled reward: spearman %.3f, kendall %.3f, argmax agreement %.3f, %.0f vs %.0f pairs/s (student vs teacher)",
             metrics.get("spearman", float("nan")), metrics.get("kendall", float("nan")), metrics.get("argmax_agreement", float("nan")),
             metrics.get("pairs_per_s_student", float("nan")), metrics.get("pairs_per_s_teacher", float("nan")))
    return metrics


def evaluate_checkpoint(cfg: RecipeConfig, model_dir: Path, name: str, out_dir: Path, reference_dir: Path | None = None,
                        split_name: str | None = None, timings: dict | None = None) -> dict:
    """Evaluate one saved captioner on a split (default: the recipe's evaluate.split); writes
    metrics.{json,md,png} + TensorBoard.

    ``timings``, if given, receives ``setup_s`` (loading the model, data and rewards) and ``eval_s``
    (scoring the images), which the dry run projects to the full split."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from rlrefine.evaluate import evaluate_model, write_report
    from rlrefine.models import RefinementCaptioner
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.trainers.common import build_reward, load_splits

    e = cfg.evaluate
    t0 = time.perf_counter()
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = RefinementCaptioner.from_pretrained(model_dir, map_location=device).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    split_name = split_name or e.split
    splits = load_splits(cfg)
    if split_name not in splits:
        raise ValueError(f"evaluate: this data has no split '{split_name}' (it has {', '.join(splits)}); "
                         f"change evaluate.split / evaluate.extra_splits")
    split = splits[split_name]
    evaluator = build_reward(e.evaluator, cfg, device, name="evaluate.evaluator")
    extra = {k: build_reward(v, cfg, device, name=f"evaluate.extra_rewards.{k}") for k, v in e.extra_rewards.items()}
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
    result.update({"model": str(model_dir), "split": split_name, "metrics_version": METRICS_VERSION,
                   "evaluate_config": e.model_dump(mode="json", exclude={"split", "extra_splits"})})
    writer = SummaryWriter(str(out_dir / "tb"))
    write_report(result, out_dir, name=name, writer=writer)
    writer.close()
    from rlrefine.evaluate import markdown_table
    from rlrefine.trainers.model_card import set_card_metrics

    if split_name == e.split:  # the card carries the main split's table
        set_card_metrics(model_dir, f"Split `{e.split}`, {result['num_images']} images, evaluator `{e.evaluator.kind}` "
                                    f"(full results: `{out_dir}/metrics.json`).\n\n" + markdown_table(result))
    return result


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def caption_folder(model_dir: Path, folder: Path, layers: list[int] | str | None = None, method: str = "greedy",
                   beams: int = 3, image_size: int = 64, max_len: int = 24, bad_image: str = "error",
                   batch_size: int = 32) -> dict[str, dict[str, str]]:
    """Caption every image of a folder: {file name: {"layer_k": caption}}; layers None = the final layer,
    "all" = every layer 0..K.

    Unreadable images raise an error naming the file, or with bad_image="skip" are reported as
    {"error": ...} and the rest are still captioned."""
    import torch

    from rlrefine.data.datasets import BadImageError, load_image
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.models import RefinementCaptioner

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    model = RefinementCaptioner.from_pretrained(model_dir).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    K = model.config.num_refine_layers
    layers = [K] if layers is None else (list(range(K + 1)) if layers == "all" else layers)
    bad = [k for k in layers if not 0 <= k <= K]
    if bad:
        raise ValueError(f"layers {bad} out of range: this captioner has layers 0..{K}")
    out: dict[str, dict[str, str]] = {}
    images, names = [], []
    for path in files:
        try:
            images.append(torch.from_numpy(load_image(path, image_size)))
            names.append(path.name)
        except Exception as exc:  # noqa: BLE001 - reported per file under the documented policy
            if bad_image != "skip":
                raise BadImageError(f"cannot read image '{path}': {exc} (use data.bad_image=skip to skip it)") from None
            out[path.name] = {"error": str(exc)}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(images[start:start + batch_size])
            pixels = model.encoder.preprocess(batch)
            seeds = torch.arange(start, start + len(batch))  # fixed z_0 per image position
            gen = model.generate(pixels, seeds, layers, method=method, num_candidates=beams if method == "beam" else 1,
                                 max_len=max_len)
            for name, per_layer in zip(names[start:], tokenizer.decode_batch(gen.tokens[:, :, 0])):
                out[name] = {f"layer_{k}": c for k, c in zip(layers, per_layer)}
    return out


def finetune_runs(cfg: RecipeConfig) -> dict[str, list]:
    """name -> one FinetuneSection per seed (`compare.seeds`) for every fine-tuning variant of the recipe
    (the `compare` variants, or the `finetune` section alone). Seed s writes to `<output>_seed<s>` (s > 0)."""
    seeds = range(cfg.compare.seeds)
    if cfg.compare.variants:
        return {name: [cfg.variant(name, s) for s in seeds] for name in cfg.compare.variants}
    f = cfg.finetune
    return {f.method: [f if s == 0 else f.model_copy(update={"output": f"{f.output}_seed{s}"}) for s in seeds]}


def finetune_variants(cfg: RecipeConfig) -> dict[str, object]:
    """name -> the FinetuneSection of every fine-tuning variant, its first seed (what a variant trains with)."""
    return {name: sections[0] for name, sections in finetune_runs(cfg).items()}


def run_finetune_variants(cfg: RecipeConfig, resume: bool, force: bool = False) -> None:
    from rlrefine.trainers.finetune import finetune

    for name, sections in finetune_runs(cfg).items():
        for s, section in enumerate(sections):
            label = name + (f" seed {cfg.seed + s}" if len(sections) > 1 else "")
            if (cfg.run_path / section.output / "model" / "config.json").exists() and not force:
                log.info("finetune variant %s: output exists, skipped", label)
                continue
            log.info("finetune variant %s (%s) ...", label, section.method)
            finetune(cfg.model_copy(update={"finetune": section, "seed": cfg.seed + s}), resume=resume)


def report(cfg: RecipeConfig, resume: bool = False) -> str:
    """Evaluate XE and every fine-tuned variant (each of its seeds) on `evaluate.split` and every
    `evaluate.extra_splits`; write report/compare.{md,json,png} (and compare_<split>.* per extra split);
    return the Markdown of all tables. A variant with several seeds is reported as mean ± std."""
    from rlrefine.evaluate import aggregate_seeds, compare_table, plot_layers

    out = cfg.run_path / "report"
    xe_dir = cfg.run_path / "pretrain" / "model"
    models = {"XE": [xe_dir]}
    for name, sections in finetune_runs(cfg).items():
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
                cached = _cached_evaluation(cfg, model_dir, sub_dir, split)
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


# Bumped when a metric's definition changes, so the report does not reuse evaluations computed the old way
# (2: the progress curve pools distances over images, rlrefine.metrics.graduality.progress_curve).
METRICS_VERSION = 2


def _cached_evaluation(cfg: RecipeConfig, model_dir: Path, out_dir: Path, split: str) -> dict | None:
    """A model's earlier evaluation in ``out_dir`` when it is still valid: written after the model's
    weights, of the same model on the same split with the same `evaluate` settings (so adding a variant
    or a seed re-evaluates only the new models) and the same `METRICS_VERSION`. None otherwise."""
    metrics, weights = out_dir / "metrics.json", Path(model_dir) / "model.safetensors"
    if not metrics.is_file() or not weights.is_file() or metrics.stat().st_mtime <= weights.stat().st_mtime:
        return None
    result = json.loads(metrics.read_text())
    settings = cfg.evaluate.model_dump(mode="json", exclude={"split", "extra_splits"})
    if (result.get("split") != split or result.get("evaluate_config") != settings or Path(result.get("model", "")) != Path(model_dir)
            or result.get("metrics_version") != METRICS_VERSION):
        return None
    log.info("report: reusing %s (newer than %s)", metrics, weights)
    return result


def _report_stage(cfg: RecipeConfig, resume: bool = False, force: bool = False) -> None:
    """The report, redone whenever the set of compared models changed (e.g. a variant or a seed was added)."""
    done = cfg.run_path / "report" / "compare.json"
    wanted = {"XE", *finetune_runs(cfg)}
    if done.is_file() and not force:
        old = json.loads(done.read_text())
        if set(old) == wanted and all(old[k].get("seeds", 1) == (1 if k == "XE" else cfg.compare.seeds) for k in old):
            log.info("report: %s already compares %s, skipped (--force redoes it)", done, ", ".join(sorted(wanted)))
            return
    print("\n" + report(cfg, resume))


def _reward_sections(cfg: RecipeConfig) -> list:
    """Every reward section a run reads: each fine-tuning variant's reward and the evaluation scores,
    with the terms of `sum` rewards."""
    todo = [*(v.reward for v in finetune_variants(cfg).values()), cfg.evaluate.evaluator, *cfg.evaluate.extra_rewards.values()]
    out = []
    while todo:
        section = todo.pop()
        out.append(section)
        todo.extend(term.reward for term in section.terms)
    return out


def needs_evaluator(cfg: RecipeConfig) -> bool:
    """True when the run reads its own learned evaluator (the encoder, a reward, or the distill teacher)."""
    sections = _reward_sections(cfg) + ([cfg.distill.teacher] if needs_distilled(cfg) else [])
    return cfg.model.encoder.kind == "evaluator" or any(s.kind == "learned" and s.path is None for s in sections)


def needs_distilled(cfg: RecipeConfig) -> bool:
    """True when a reward of the run is the run's own distilled student (`distilled` without a path)."""
    return any(s.kind == "distilled" and s.path is None for s in _reward_sections(cfg))


def stages(cfg: RecipeConfig) -> list[Stage]:
    """The recipe's stages in order. train-evaluator and distill-reward are there only when the run
    reads their output (e.g. the COCO recipe trains on PAC-S directly: neither runs)."""
    from rlrefine.trainers.pretrain import pretrain

    out = []
    if needs_evaluator(cfg):
        out.append(Stage("train-evaluator", "evaluator/report.json", train_evaluator_stage))
    out.append(Stage("pretrain", "pretrain/model/config.json", lambda c, r, f: pretrain(c, resume=r)))
    if needs_distilled(cfg):
        out.append(Stage("distill-reward", "distill/report.json", distill_stage))
    out.append(Stage("finetune", "", run_finetune_variants))  # each variant is skipped on its own
    out.append(Stage("report", "", _report_stage))
    return out


def run_pipeline(cfg: RecipeConfig, force: bool = False, resume: bool = False) -> None:
    """All stages in order, with a progress line per stage; done stages are skipped unless forced."""
    todo = stages(cfg)
    t_start = time.time()
    for i, stage in enumerate(todo, 1):
        if stage.marker and (cfg.run_path / stage.marker).exists() and not force:
            log.info("[%d/%d] %s: %s exists, skipped (--force redoes it)", i, len(todo), stage.name, cfg.run_path / stage.marker)
            continue
        log.info("[%d/%d] %s ...", i, len(todo), stage.name)
        t0 = time.time()
        stage.run(cfg, resume, force)
        log.info("[%d/%d] %s done in %.0f s (total %.0f s)", i, len(todo), stage.name, time.time() - t0, time.time() - t_start)
