"""benchmarks/gpu_check.py: without a GPU, one JSON line saying so and exit code 0; with ``--device cpu`` at toy
sizes (slow), the whole check rehearsed on real COCO images: every figure it reports on a GPU is there."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TINY_COCO = BENCH.parent.parent / "shared" / "data" / "tiny_coco"


def load():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    result = load().main([])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == result
    assert result["benchmark"] == "gpu_check" and result["gpu"] is None
    assert "no CUDA GPU" in result["message"] and "--device cpu" in result["message"]
    assert {"device", "threads", "load_average", "torch"} <= set(result)


def test_the_script_without_a_gpu_exits_0():
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["gpu"] is None


SMALL = "rlrefine-gpu-check-clip-small-quickgelu"
SMALL_CFG = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.mark.slow
def test_rehearsal_on_cpu_reports_every_figure(tmp_path, capsys):
    """The GPU path's plumbing, on the CPU at toy sizes: fabricated checkpoints, realsize, the batch search, the
    dry run of the real recipe (data, formats and DiCO settings as shipped; models shrunk)."""
    if not (TINY_COCO / "annotations").is_dir():
        pytest.skip(f"the real-image fixture is not there: {TINY_COCO}")
    from rewards.loading import register_model_config

    register_model_config(SMALL, SMALL_CFG)
    overrides = [f"model.encoder.model_name={SMALL}", "model.d_model=32", "model.num_slots=4", "model.num_refine_layers=2",
                 "model.n_heads=2", "model.readout_layers=1", "data.image_size=64", "data.num_workers=0",
                 "pretrain.batch_size=4", "pretrain.mixed_precision=no", "finetune.batch_size=2",
                 "finetune.num_candidates=2", "finetune.max_len=8", "finetune.mixed_precision=no",
                 f"finetune.reward.model_name={SMALL}", f"evaluate.evaluator.model_name={SMALL}",
                 f"evaluate.extra_rewards.refpac.model_name={SMALL}", f"distill.teacher.model_name={SMALL}"]
    argv = ["--device", "cpu", "--threads", "1", "--clip-model", SMALL, "--out", str(tmp_path), "--max-batch", "4",
            "--realsize-args", "--repeats 1 --warmup 0 --student-width 32 --student-layers 1 --student-heads 2",
            *[a for o in overrides for a in ("--override", o)]]
    r = load().main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    assert r["gpu"] is None and r["checkpoints"].startswith("fabricated")
    for key in ("xe_step_s", "dico_step_s", "scst_step_s", "projected_total_h", "decode_tokens_per_s",
                "generate_tokens_per_s", "decode_vs_generate"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert (r["xe_batch"], r["dico_batch"], r["scst_batch"]) == (4, 2, 2)  # the recipe's (overridden) batch sizes
    assert isinstance(r["dico_memory_per_image_mb"], float)
    assert r["batch_search"] == [{"batch": 4, "fits": True, "peak_mb": r["batch_search"][0]["peak_mb"]}]
    assert r["max_dico_batch"] == 4 and r["first_oom_batch"] is None  # stopped at --max-batch
    # the real-scale recipe's dico_distilled variant reads a text student, so its distill-reward stage is projected too
    assert set(r["projected_s_by_stage"]) == {"pretrain", "distill-reward", "finetune[dico]", "finetune[dico_distilled]",
                                              "finetune[scst]", "report"}
    assert r["realsize"]["K"] == 2 and r["realsize"]["d_model"] == 32  # realsize ran at the recipe's sizes
    assert Path(r["dry_run_report"]).is_file()
