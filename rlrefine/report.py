"""The report: every model of a run evaluated per layer, side by side (`rlrefine evaluate`, `rlrefine report`).

Where it sits: above `rlrefine.evaluate` (the metrics of one model) and below the pipeline and the CLI.
`evaluate_checkpoint` evaluates one saved captioner on a split and writes ``metrics.{json,md,png}``,
TensorBoard scalars and, on the recipe's main split, the model card's metrics; it also writes
``captions_<split>.jsonl`` (one line per image: its id, the caption at every layer 0..K and, for shapes
data, the scene's objects). `report` evaluates the XE model and every fine-tuned variant (each of its
seeds) on `evaluate.split` and every `evaluate.extra_splits`, reusing an earlier evaluation while it is
still valid (`cached_evaluation`), and writes ``report/compare.{md,json,png}`` (and ``compare_<split>.*``);
on shapes data also ``report/candidates.json``, what each method's candidates hold before and after
fine-tuning (`candidate_diagnostic`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from rlrefine.config import RecipeConfig
from rlrefine.evaluate import metrics_version

log = logging.getLogger(__name__)

NOT_PER_MODEL = {"split", "extra_splits", "candidate_diagnostic"}  # evaluate keys that do not change a model's evaluation

__all__ = ["EvaluationInputs", "cached_evaluation", "evaluate_checkpoint", "report", "report_stage"]


class EvaluationInputs:
    """What every model's evaluation in one report shares, built on first use and then reused: the data splits,
    the evaluator and extra rewards (loaded once, not once per model and split) and the frozen reference models."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg, self.device = cfg, cfg.torch_device
        self._splits: dict | None = None
        self._rewards: tuple | None = None
        self._references: dict[Path, torch.nn.Module] = {}

    @property
    def splits(self) -> dict:
        from rlrefine.data.sources import load_splits

        if self._splits is None:
            self._splits = load_splits(self.cfg.data)
        return self._splits

    def split(self, name: str):
        if name not in self.splits:
            raise ValueError(f"evaluate: this data has no split '{name}' (it has {', '.join(self.splits)}); "
                             f"change evaluate.split / evaluate.extra_splits")
        return self.splits[name]

    @property
    def rewards(self) -> tuple:
        """(evaluator, {name: extra reward})."""
        from rewards.registry import build_reward

        if self._rewards is None:
            e, cfg, train = self.cfg.evaluate, self.cfg, self.splits["train"]
            evaluator = build_reward(e.evaluator, cfg.reward_context("evaluate.evaluator", self.device, train))
            extra = {k: build_reward(v, cfg.reward_context(f"evaluate.extra_rewards.{k}", self.device, train))
                     for k, v in e.extra_rewards.items()}
            self._rewards = (evaluator, extra)
        return self._rewards

    def reference(self, path: Path) -> torch.nn.Module:
        from rlrefine.models import RefinementCaptioner

        path = Path(path).resolve()
        if path not in self._references:
            self._references[path] = RefinementCaptioner.from_pretrained(path, map_location=self.device).eval()
        return self._references[path]


def evaluate_checkpoint(cfg: RecipeConfig, model_dir: Path, name: str, out_dir: Path, reference_dir: Path | None = None,
                        split_name: str | None = None, timings: dict | None = None,
                        inputs: EvaluationInputs | None = None) -> dict:
    """Evaluate one saved captioner on a split (default: the recipe's evaluate.split); writes
    metrics.{json,md,png}, captions_<split>.jsonl and TensorBoard scalars into ``out_dir``.

    ``inputs`` shares the data, rewards and reference between the evaluations of one report (default: built
    for this call). ``timings``, if given, receives ``setup_s`` (loading the model, data and rewards) and
    ``eval_s`` (scoring the images), which the dry run projects to the full split."""
    from torch.utils.tensorboard import SummaryWriter

    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.evaluate import evaluate_model, markdown_table, write_captions, write_report
    from rlrefine.models import RefinementCaptioner
    from rlrefine.trainers.model_card import set_card_metrics

    e = cfg.evaluate
    t0 = time.perf_counter()
    inputs = inputs or EvaluationInputs(cfg)
    model = RefinementCaptioner.from_pretrained(model_dir, map_location=inputs.device).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    split_name = split_name or e.split
    split = inputs.split(split_name)
    evaluator, extra = inputs.rewards
    reference = None
    if reference_dir is not None and e.kl_reference and Path(reference_dir).resolve() != Path(model_dir).resolve():
        reference = inputs.reference(reference_dir)
    t1 = time.perf_counter()
    result = evaluate_model(model, tokenizer, split, evaluator, num_images=e.num_images, image_size=cfg.data.image_size,
                            max_len=cfg.finetune.max_len, schedule_kind=cfg.pretrain.schedule, schedule_eps=cfg.pretrain.schedule_eps,
                            weights_kind=cfg.pretrain.layer_weights, alpha=e.alpha, extra_rewards=extra, reference=reference,
                            java_metrics=e.java_metrics)
    if timings is not None:
        timings.update(setup_s=t1 - t0, eval_s=time.perf_counter() - t1)
    captions = result.pop("captions")
    result.update({"model": str(model_dir), "split": split_name, "metrics_version": metrics_version(),
                   "evaluate_config": e.model_dump(mode="json", exclude=NOT_PER_MODEL)})
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
    settings = cfg.evaluate.model_dump(mode="json", exclude=NOT_PER_MODEL)
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
    inputs = EvaluationInputs(cfg)  # the data, rewards and reference, loaded once for every model and split
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
                            evaluate_checkpoint(cfg, model_dir, sub, sub_dir, reference_dir=xe_dir, split_name=split,
                                                inputs=inputs))
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
    if cfg.data.kind == "shapes" and cfg.evaluate.candidate_diagnostic:
        diagnostic = candidate_diagnostic(cfg, inputs.splits)
        (out / "candidates.json").write_text(json.dumps(diagnostic, indent=1))
        tables.append(candidate_table(diagnostic))
    text = "\n".join(tables)
    (out / "compare.md").write_text(text)
    return text


@torch.no_grad()
def method_candidates(cfg: RecipeConfig, section, model_dir: Path, split, index) -> list[list[str]]:
    """The final-layer candidates a variant's method draws (``section``: its finetune section) from the captioner in
    ``model_dir`` for the images ``index`` of ``split``: the evaluation z_0 seeds, a fixed sampling seed."""
    from rlrefine.data.batches import eval_z0_seeds, load_images
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.methods import METHODS
    from rlrefine.models import RefinementCaptioner

    model = RefinementCaptioner.from_pretrained(model_dir).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    method = METHODS[section.method](section.method_config, section, tokenizer)
    K = model.config.num_refine_layers
    generator = torch.Generator().manual_seed(cfg.seed)
    out: list[list[str]] = []
    for start in range(0, len(index), 64):
        idx = index[start:start + 64]
        pixels = model.encoder.preprocess(load_images(split, idx, cfg.data.image_size))
        gen = method.generate(model, pixels, eval_z0_seeds(idx), [K], generator)
        out.extend([per_img[0] for per_img in tokenizer.decode_batch(gen.tokens)])
    return out


def candidate_diagnostic(cfg: RecipeConfig, splits: dict | None = None) -> dict:
    """Shapes data: per fine-tuning variant (its first seed), what its method's candidates at layer K hold at the
    start (drawn from the XE model) and at the end of fine-tuning (from the fine-tuned model), on the evaluation
    split and on test_novel (`rlrefine.metrics.grounding.candidate_coverage`): the share of multi-object images
    where a candidate states a true relation, and of images with an unseen colour–shape pair where a candidate
    names it. Written to report/candidates.json; says whether the reward or the candidates limit learning."""
    import numpy as np

    from rlrefine.data.sources import load_splits
    from rlrefine.metrics.grounding import candidate_coverage

    from rlrefine.data.shapes import DEFAULT_HELD_OUT

    splits = splits if splits is not None else load_splits(cfg.data)
    xe_dir = cfg.run_path / "pretrain" / "model"
    result: dict = {}
    start: dict[str, dict] = {}  # the XE model's coverage, per way of drawing candidates
    for name, section in cfg.finetune_variants().items():
        result[name] = {}
        for split_name in dict.fromkeys([cfg.evaluate.split, "test_novel"]):
            if split_name not in splits:
                continue
            split = splits[split_name]
            index = np.flatnonzero(~np.asarray(split.is_label, dtype=bool))[:cfg.evaluate.num_images]
            scenes = [split.scenes[i] for i in index]
            # variants that draw alike (dico, dico_teacher, ... : the same beams) share the XE model's candidates
            draws = json.dumps([section.method, section.method_config.model_dump(mode="json"), section.num_candidates,
                                section.max_len, split_name])
            if draws not in start:
                start[draws] = candidate_coverage(method_candidates(cfg, section, xe_dir, split, index), scenes,
                                                  DEFAULT_HELD_OUT)
            end = method_candidates(cfg, section, cfg.run_path / section.output / "model", split, index)
            result[name][split_name] = {"start": start[draws], "end": candidate_coverage(end, scenes, DEFAULT_HELD_OUT)}
    return result


def candidate_table(diagnostic: dict) -> str:
    """The candidate diagnostic as Markdown: one row per variant and split, start -> end."""
    lines = ["### Candidates at layer K: what each method's candidates hold (XE model at the start -> fine-tuned model "
             "at the end)\n", "| variant | split | a candidate states a true relation (multi-object images) | a candidate "
             "names the image's unseen pair |", "|---|---|---|---|"]
    for name, per_split in diagnostic.items():
        for split, d in per_split.items():
            s, e = d["start"], d["end"]
            unseen = f"{s['unseen_pair']:.3f} -> {e['unseen_pair']:.3f}" if s["images_unseen"] else "n/a"
            lines.append(f"| {name} | {split} | {s['true_relation']:.3f} -> {e['true_relation']:.3f} | {unseen} |")
    return "\n".join(lines) + "\n"


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
