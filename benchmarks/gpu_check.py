"""One command that measures a GPU for the real recipe: step times, memory, the largest batch, decode speed
and the projected wall time of recipes/coco_vitb32.yaml, on real COCO images with checkpoints in the real
formats. Nothing is downloaded.

    python benchmarks/gpu_check.py                      # on the GPU machine: ../shared/data/tiny_coco, fabricated weights
    python benchmarks/gpu_check.py --annotations /data/coco/annotations --images /data/coco \\
        --encoder-checkpoint /models/ViT-B-32.pt --reward-checkpoint /models/pacs/clip_ViT-B-32.pth

Without a GPU it prints one JSON line saying so (``"gpu": null``) and exits 0. ``--device cpu`` runs the same
check on the CPU, to rehearse it (give small sizes with ``--override``: a real-size CPU run takes hours).

What it runs (docs/performance_realsize.md, "GPU check", lists every key of the JSON line):

1. checkpoints: unless given, random `--clip-model` weights (ViT-B-32-quickgelu) written in the real formats, as
   tests/test_dry_run.py fabricates them: the encoder as an open_clip state dict, the reward as PAC-S's
   ``{"state_dict": ...}`` file (fp16);
2. `benchmarks/realsize.py` (its ``main``) at the recipe's sizes and fine-tuning batch, under the recipe's
   fine-tuning precision: the DiCO / XE step breakdown, memory per image, readout decode against transformers'
   ``generate``;
3. the largest DiCO batch that fits: realsize's memory step at the recipe's batch × 2, × 4, ... until the GPU runs
   out of memory (or ``--max-batch``);
4. the dry run (`rlrefine.dry_run.dry_run`) of the recipe at its own batch sizes: seconds per XE, DiCO and SCST
   step, peak GPU memory per stage, and the projected wall time of the whole recipe.
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO.parent / "shared" / "data" / "tiny_coco"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ...; cpu rehearses the check without a GPU")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "coco_vitb32.yaml"))
    p.add_argument("--annotations", default=None, help="COCO annotations (default: <tiny_coco>/annotations)")
    p.add_argument("--images", default=None, help="COCO image root (default: ../shared/data/tiny_coco)")
    p.add_argument("--encoder-checkpoint", default=None, help="default: fabricated random weights (real format)")
    p.add_argument("--reward-checkpoint", default=None, help="default: fabricated random PAC-S file (real format)")
    p.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip architecture of fabricated weights")
    p.add_argument("--out", default=None, help="working folder (checkpoints, the dry run); default: a temporary one")
    p.add_argument("--max-batch", type=int, default=1024, help="stop the batch search here")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every part (repeatable), e.g. model.d_model=256")
    p.add_argument("--realsize-args", default="", help="extra flags for benchmarks/realsize.py, e.g. '--repeats 1'")
    p.add_argument("--skip-realsize", action="store_true")
    p.add_argument("--skip-batch-search", action="store_true")
    p.add_argument("--skip-dry-run", action="store_true")
    return p.parse_args(argv)


def no_gpu(args, device: torch.device) -> dict:
    """The one line printed where there is no GPU to measure."""
    args.quick = False
    env = C.environment(args, torch.device("cpu"))
    return {"benchmark": "gpu_check", "gpu": None,
            "message": f"no CUDA GPU here (torch.cuda.is_available() is False for --device {device}): nothing "
                       f"measured; run this on the GPU machine, or --device cpu to rehearse it",
            "peak_memory_mb": None, **env}


def fabricate_checkpoints(model_name: str, out: Path) -> tuple[Path, Path]:
    """Random weights of ``model_name`` in the real formats: the encoder's open_clip state dict and PAC-S's
    ``{"state_dict": ...}`` file, both fp16 (as tests/test_dry_run.py)."""
    import open_clip

    from rlrefine.models.clip_checkpoint import mute_random_init_warning

    torch.manual_seed(0)
    with mute_random_init_warning():
        model = open_clip.create_model(model_name, pretrained=None)
    half = {k: v.half() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(half, out / "encoder.pt")
    torch.save({"state_dict": half}, out / "clip_pacs.pth")
    return out / "encoder.pt", out / "clip_pacs.pth"


@contextmanager
def precision(mixed_precision: str):
    """realsize.py makes a plain `Accelerator()`, which reads its mixed precision from the environment."""
    from accelerate.state import AcceleratorState

    old = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = mixed_precision
    AcceleratorState._reset_state(reset_partial_state=False)  # an earlier accelerator's precision would stick
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
        if old is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = old


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(err).lower()


def realsize_argv(cfg, args, device: torch.device) -> list[str]:
    """realsize.py's flags for the recipe's captioner, reward and fine-tuning batch."""
    m, f = cfg.model, cfg.finetune
    encoder = m.encoder.model_name if m.encoder.kind == "open_clip" else "tiny_vit"
    return ["--device", str(device), "--threads", str(args.threads), "--K", str(m.num_refine_layers),
            "--n", str(f.num_candidates), "--max-len", str(f.max_len), "--d-model", str(m.d_model),
            "--slots", str(m.num_slots), "--heads", str(m.n_heads), "--readout-layers", str(m.readout_layers),
            "--encoder", encoder, "--image-size", str(cfg.data.image_size),
            "--reward-model", f.reward.model_name or args.clip_model, "--batch", str(f.batch_size)]


def batch_search(realsize, base: list[str], start: int, limit: int, device: torch.device) -> dict:
    """One DiCO step (realsize's memory step) at start, 2·start, 4·start, ... until out of memory or past ``limit``."""
    tried, fits, oom = [], None, None
    batch = start
    while batch <= limit:
        try:
            r = realsize.main([*base, "--no-step", "--no-decode", "--memory", "--memory-batches", f"1,{batch}"])
            tried.append({"batch": batch, "fits": True, "peak_mb": r["peak_memory_mb_by_batch"][1]})
            fits = batch
        except Exception as err:  # noqa: BLE001 - out of memory ends the search; anything else is a real error
            if not is_oom(err):
                raise
            tried.append({"batch": batch, "fits": False, "error": type(err).__name__})
            oom = batch
            break
        finally:
            free(device)
        batch *= 2
    return {"max_dico_batch": fits, "first_oom_batch": oom, "batch_search": tried}


def dry_run_figures(cfg, device: torch.device) -> dict:
    """The dry run at the recipe's batch sizes (capped on a CPU): s/step per stage, peaks, the projection."""
    from rlrefine.dry_run import dry_run

    report = dry_run(cfg, batch=None if device.type == "cuda" else "auto")
    rows = {r["stage"]: r for r in report["stages"]}
    methods = {f"finetune[{name}]": section.method for name, section in cfg.finetune_variants().items()}
    out = {"step_s_by_stage": {s: r["s_per_step"] for s, r in rows.items()},
           "batch_by_stage": {s: r["full_batch"] for s, r in rows.items() if r["full_batch"] is not None},
           "peak_gpu_gb_by_stage": {s: r["peak_cuda_gb"] for s, r in rows.items()},
           "projected_s_by_stage": {s: r["projected_s"] for s, r in rows.items()},
           "projected_total_h": report["projected_total_h"],
           "dry_run_report": str(cfg.run_path / "dry_run" / "report.json")}
    for key, stage in (("xe", "pretrain"),
                       ("dico", next((s for s, m in methods.items() if m == "dico"), None)),
                       ("scst", next((s for s, m in methods.items() if m == "scst"), None))):
        row = rows.get(stage)
        out[f"{key}_step_s"] = None if row is None else row["s_per_step"]
        out[f"{key}_batch"] = None if row is None else row["full_batch"]
    return out


def main(argv=None) -> dict:
    from rlrefine.config import load_recipe

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return C.emit(no_gpu(args, device))
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    total_mem = C.PeakMemory(device)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    images = Path(args.images) if args.images else TINY_COCO
    annotations = Path(args.annotations) if args.annotations else images / "annotations"
    if not annotations.exists():
        raise SystemExit(f"gpu_check: annotations not found: {annotations} (give --annotations and --images)")
    if args.encoder_checkpoint and args.reward_checkpoint:
        encoder_ckpt, reward_ckpt = Path(args.encoder_checkpoint), Path(args.reward_checkpoint)
        checkpoints = "given"
    else:
        encoder_ckpt, reward_ckpt = fabricate_checkpoints(args.clip_model, out / "checkpoints")
        encoder_ckpt = Path(args.encoder_checkpoint or encoder_ckpt)
        reward_ckpt = Path(args.reward_checkpoint or reward_ckpt)
        checkpoints = f"fabricated random {args.clip_model} (real formats)"
    cfg = load_recipe(args.recipe, [
        f"paths.annotations={annotations}", f"paths.images={images}", f"paths.encoder_checkpoint={encoder_ckpt}",
        f"paths.reward_checkpoint={reward_ckpt}", f"run_dir={out / 'run'}",
        f"device={'cuda' if device.type == 'cuda' else 'cpu'}", *args.override])
    result = {"benchmark": "gpu_check",
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "recipe": args.recipe, "annotations": str(annotations), "images": str(images), "checkpoints": checkpoints,
              "mixed_precision": {"pretrain": cfg.pretrain.mixed_precision, "finetune": cfg.finetune.mixed_precision}}

    if not (args.skip_realsize and args.skip_batch_search):
        import realsize

        base = [*realsize_argv(cfg, args, device), *shlex.split(args.realsize_args)]
        with precision(cfg.finetune.mixed_precision):
            if not args.skip_realsize:
                b = cfg.finetune.batch_size
                r = realsize.main([*base, "--memory-batches", f"{max(1, b // 2)},{b}"] if b > 1 else base)
                free(device)
                result.update(dico_memory_per_image_mb=r.get("memory_per_image_mb"),
                              decode_tokens_per_s=r.get("readout_tokens_per_s"),
                              generate_tokens_per_s=r.get("generate_tokens_per_s"),
                              decode_vs_generate=r.get("decode_vs_generate"), realsize=r)
            if not args.skip_batch_search:
                result.update(batch_search(realsize, base, 2 * cfg.finetune.batch_size, args.max_batch, device))
    if not args.skip_dry_run:
        result.update(dry_run_figures(cfg, device))
        free(device)
    args.quick = False
    result.update(seconds=round(time.perf_counter() - t0, 1), peak_memory_mb=total_mem.peak_mb(),
                  **C.environment(args, device))
    return C.emit(result)


if __name__ == "__main__":
    main()
