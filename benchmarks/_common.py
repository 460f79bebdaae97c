"""What the benchmarks share: flags, timing (warm-up + median), peak memory, the JSON line, and the
benchmark captioner / data.

Every benchmark is a script `python benchmarks/X.py [--quick] [--threads N]` whose last output line is
one JSON object with a "benchmark" key, the figures, `peak_memory_mb`, `device`, `threads` and
`load_average` (os.getloadavg() at the end of the run: on a shared machine, read timings with it).
Each script's `main(argv) -> dict` is what the tests call in-process.

Memory: on CPU, `peak_memory_mb` is the growth of the process's high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) over a baseline taken at the start of what is measured;
tracemalloc does not see torch's allocations. On CUDA it is `torch.cuda.max_memory_allocated` above
what was allocated at the start.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# The embedded default's architecture (recipes/tiny.yaml, model section); K comes from each benchmark.
TINY_ARCH = dict(d_model=128, num_slots=8, n_heads=4, readout_layers=2, mlp_ratio=4)
TINY_ENCODER = dict(kind="tiny_vit", image_size=64, patch_size=8, width=128, depth=2, heads=4)


# ------------------------------------------------------------------------------------- flags
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller batch and fewer repeats (< 1 min on CPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: os.cpu_count()); on a loaded machine 1 is often faster")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args) -> torch.device:
    """Threads and seeds; returns the device."""
    torch.set_num_threads(max(1, int(args.threads)))
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} asked for CUDA but torch.cuda.is_available() is False")
    return device


def environment(args, device: torch.device) -> dict:
    """Conditions of the run, to print beside the figures."""
    env = {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__, "quick": bool(args.quick)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def emit(result: dict) -> dict:
    """Print the result as one JSON line (the last line of the script's output) and return it."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, every timed repeat) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [timeit(fn, device) for _ in range(max(1, repeats))]
    return statistics.median(times), times


class PhaseTimer:
    """Accumulates wall time per named phase; `wrap(name, fn)` times every call of fn."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a, **kw):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync(self.device)
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def next_iteration(self, keep: bool = True) -> None:
        if keep:
            self.history.append(self.current)
        self.current = {}

    def medians(self) -> dict[str, float]:
        names = sorted({k for h in self.history for k in h})
        return {k: statistics.median(h.get(k, 0.0) for h in self.history) for k in names}


# ------------------------------------------------------------------------------------- memory
def release_memory() -> None:
    """Free what can be freed before a memory measurement (Python garbage, glibc's free lists)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2 ** 20  # KiB on Linux, bytes on macOS


def _current_rss_mb() -> float | None:
    """Resident memory now (Linux /proc/self/statm), or None where that file does not exist."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of what runs after construction (or `reset()`), above the memory in use then, in MB.

    CPU: ru_maxrss (the process's resident high-water mark) at the end minus the resident memory at
    the baseline (/proc/self/statm; ru_maxrss itself where that is missing). The high-water mark
    only moves when the measured work peaks above every earlier peak of the process; `exact` says
    whether it did (if not, the figure is an upper bound). Call `release_memory()` before `reset()`.
    CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the baseline (always exact).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            self.prior_max = _maxrss_mb()
            current = _current_rss_mb()
            self.base = self.prior_max if current is None else min(current, self.prior_max)

    @property
    def exact(self) -> bool:
        return self.device.type == "cuda" or _maxrss_mb() > self.prior_max

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20 - self.base, 1)
        return round(_maxrss_mb() - self.base, 1)


# ------------------------------------------------------------------------------------- models / data
def shapes_data(num_images: int, seed: int = 0):
    """`num_images` shapes images (uint8 [B, 64, 64, 3]) with their reference captions, and the
    word-level tokenizer of the embedded default trained on 256 shapes images' captions (vocab 45)."""
    from rlrefine.data.shapes import ShapesConfig, generate_shapes
    from rlrefine.data.tokenizer import CaptionTokenizer

    n = max(256, num_images)
    train = generate_shapes(ShapesConfig(num_train=n, num_val=1, num_test=1, num_test_novel=1, label_fraction=0.0, seed=seed))["train"]
    tokenizer = CaptionTokenizer.train([c for refs in train.captions[:256] for c in refs])
    images = torch.as_tensor(train.images[:num_images])
    return images, [list(refs) for refs in train.captions[:num_images]], tokenizer


def benchmark_captioner(vocab_size: int, num_refine_layers: int, max_len: int, pad_id: int = 0, bos_id: int = 1,
                        eos_id: int = 2, suppress_eos: bool = True, weight_std: float | None = None, seed: int = 0,
                        readout_layers: int | None = None, d_model: int | None = None):
    """The embedded default's captioner (recipes/tiny.yaml) with K = `num_refine_layers`, random init.

    suppress_eos: the config's eos_id is set to `vocab_size`, an id the model cannot emit, so every
    caption runs to max_len and the benchmarks compare decodes of a known, fixed length (a random
    model would otherwise stop after a random number of tokens).
    weight_std: redraw every matrix from N(0, weight_std^2) (as tests/test_generation.py does): a
    nanoGPT-init random model has nearly uniform next-token distributions, so beam search would hinge
    on float-rounding ties and two correct decoders could legitimately disagree.
    """
    from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner

    arch = dict(TINY_ARCH)
    if readout_layers is not None:
        arch["readout_layers"] = readout_layers
    if d_model is not None:
        arch["d_model"] = d_model
        arch["n_heads"] = max(1, min(arch["n_heads"], d_model // 16))
    torch.manual_seed(seed)
    cfg = CaptionerConfig(encoder=EncoderConfig(**TINY_ENCODER), num_refine_layers=num_refine_layers,
                          vocab_size=vocab_size, max_len=max_len, pad_id=pad_id, bos_id=bos_id,
                          eos_id=vocab_size if suppress_eos else eos_id, **arch)
    model = RefinementCaptioner(cfg)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, weight_std)
    return model


def random_score(kind: str, device: torch.device, seed: int = 0):
    """A reward with the architecture of the embedded default's teacher (`kind="teacher"`: the learned
    evaluator, `evaluator` in recipes/tiny.yaml) or distilled student (`"student"`: `distill.student`
    there, with its word vocabulary trained on shapes captions), with random weights: what it costs does
    not depend on what it learned. `kind` may also be a folder written by train-evaluator /
    distill-reward (evaluator.json or student.json), loaded as such."""
    from rewards import DistilledScore, LearnedScore
    from rewards.distill import WordTokens
    from rewards.evaluator import build_dual_encoder
    from rlrefine.config import load_recipe

    path = Path(kind)
    if kind not in ("teacher", "student"):
        if (path / DistilledScore.manifest_name).is_file():
            return DistilledScore.from_dir(path, device=device)
        if (path / LearnedScore.manifest_name).is_file():
            return LearnedScore.from_dir(path, device=device)
        raise FileNotFoundError(f"reward {kind!r}: neither 'teacher', 'student' nor a folder with "
                                f"{LearnedScore.manifest_name} or {DistilledScore.manifest_name}")
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml")
    cfg = recipe.evaluator if kind == "teacher" else recipe.distill.student
    cls = LearnedScore if kind == "teacher" else DistilledScore
    vocab = shapes_data(1)[2] if getattr(cfg, "tokenizer", "open_clip") == "word" else None
    torch.manual_seed(seed)
    _, model, tokenizer, preprocess = build_dual_encoder(cfg.model_name, cfg.model_cfg(vocab) if vocab else cfg.model_cfg(),
                                                         device=device)
    if vocab is not None:
        tokenizer = WordTokens(vocab, cfg.context_length)
    return cls(model, preprocess, tokenizer, w=2.5, text_prefix=cfg.text_prefix, name=f"{cls.__name__}[{kind}, random init]")
