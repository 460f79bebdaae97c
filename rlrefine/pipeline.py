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
    ecfg = dataclasses.replace(cfg.evaluator, device=str(acc.device))
    metrics = train_evaluator(ecfg, splits["train"], splits["val"], cfg.run_path / "evaluator", logger=acc)
    (cfg.run_path / "evaluator" / "report.json").write_text(json.dumps(metrics, indent=1))
    if acc.is_main_process:
        from rlrefine.trainers.model_card import scalars_table, write_model_card

        write_model_card(cfg.run_path / "evaluator", "Learned evaluator (teacher reward)",
                         "A CLIP-style dual encoder (open_clip classes) trained contrastively with hard negatives "
                         "(`rlrefine train-evaluator`); load it with `rewards.LearnedScore.from_dir`.", cfg, scalars_table(metrics))
    acc.end_training()
    log.info("evaluator: swap accuracy %.3f, R@1 i2t %.3f", metrics.get("swap_acc", float("nan")), metrics.get("r1_i2t", float("nan")))
    return metrics


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
    teacher = build_reward(d.teacher, cfg, acc.device)
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


def evaluate_checkpoint(cfg: RecipeConfig, model_dir: Path, name: str, out_dir: Path, reference_dir: Path | None = None) -> dict:
    """Evaluate one saved captioner on the recipe's evaluate.split; writes metrics.{json,md,png} + TensorBoard."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from rlrefine.evaluate import evaluate_model, write_report
    from rlrefine.models import RefinementCaptioner
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.trainers.common import build_reward, load_splits

    e = cfg.evaluate
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = RefinementCaptioner.from_pretrained(model_dir, map_location=device).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    split = load_splits(cfg)[e.split]
    evaluator = build_reward(e.evaluator, cfg, device)
    extra = {k: build_reward(v, cfg, device) for k, v in e.extra_rewards.items()}
    reference = None
    if reference_dir is not None and e.kl_reference and Path(reference_dir).resolve() != Path(model_dir).resolve():
        reference = RefinementCaptioner.from_pretrained(reference_dir, map_location=device).eval()
    result = evaluate_model(model, tokenizer, split, evaluator, num_images=e.num_images, image_size=cfg.data.image_size,
                            max_len=cfg.finetune.max_len, schedule_kind=cfg.pretrain.schedule, schedule_eps=cfg.pretrain.schedule_eps,
                            weights_kind=cfg.pretrain.layer_weights, alpha=e.alpha, extra_rewards=extra, reference=reference)
    result.update({"model": str(model_dir), "split": e.split})
    writer = SummaryWriter(str(out_dir / "tb"))
    write_report(result, out_dir, name=name, writer=writer)
    writer.close()
    from rlrefine.evaluate import markdown_table
    from rlrefine.trainers.model_card import set_card_metrics

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


def finetune_variants(cfg: RecipeConfig) -> dict[str, object]:
    """name -> FinetuneSection for every fine-tuning run of the recipe (the `compare` variants, or `finetune`)."""
    if cfg.compare:
        return {name: cfg.variant(name) for name in cfg.compare}
    return {cfg.finetune.method: cfg.finetune}


def run_finetune_variants(cfg: RecipeConfig, resume: bool, force: bool = False) -> None:
    from rlrefine.trainers.finetune import finetune

    for name, section in finetune_variants(cfg).items():
        if (cfg.run_path / section.output / "model" / "config.json").exists() and not force:
            log.info("finetune variant %s: output exists, skipped", name)
            continue
        log.info("finetune variant %s (%s) ...", name, section.method)
        finetune(cfg.model_copy(update={"finetune": section}), resume=resume)


def report(cfg: RecipeConfig, resume: bool = False) -> str:
    """Evaluate XE and every fine-tuned variant; write report/compare.{md,json,png}; return the table."""
    from rlrefine.evaluate import compare_table, plot_layers

    out = cfg.run_path / "report"
    xe_dir = cfg.run_path / "pretrain" / "model"
    models = {"XE": xe_dir}
    for name, section in finetune_variants(cfg).items():
        models[name] = cfg.run_path / section.output / "model"
    results = {}
    for name, model_dir in models.items():
        t0 = time.time()
        results[name] = evaluate_checkpoint(cfg, model_dir, name, out / name, reference_dir=xe_dir)
        log.info("evaluated %s in %.0f s", name, time.time() - t0)
    table = compare_table(results)
    header = (f"Test split '{cfg.evaluate.split}', {results['XE']['num_images']} images, K = {results['XE']['K']}; "
              f"evaluator = {cfg.evaluate.evaluator.kind}; G = graduality on text embeddings (1 = on schedule).\n\n")
    (out / "compare.md").write_text(header + table)
    (out / "compare.json").write_text(json.dumps({k: {kk: v for kk, v in r.items() if kk != "examples"} for k, r in results.items()}, indent=1))
    plot_layers(results, out / "compare.png")
    return table


def _report_stage(cfg: RecipeConfig, resume: bool = False, force: bool = False) -> None:
    """The report, redone whenever the set of compared models changed (e.g. a variant was added)."""
    done = cfg.run_path / "report" / "compare.json"
    wanted = {"XE", *finetune_variants(cfg)}
    if done.is_file() and not force and set(json.loads(done.read_text())) == wanted:
        log.info("report: %s already compares %s, skipped (--force redoes it)", done, ", ".join(sorted(wanted)))
        return
    print("\n" + report(cfg, resume))


def stages(cfg: RecipeConfig) -> list[Stage]:
    from rlrefine.trainers.pretrain import pretrain

    out = [Stage("train-evaluator", "evaluator/report.json", train_evaluator_stage),
           Stage("pretrain", "pretrain/model/config.json", lambda c, r, f: pretrain(c, resume=r)),
           Stage("distill-reward", "distill/report.json", distill_stage)]
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
