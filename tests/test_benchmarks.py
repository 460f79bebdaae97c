"""benchmarks/*.py run in-process with the tiniest settings: each prints one JSON line with its keys,
and the decode benchmark checked the cached and naive decodes agree. No timing assertions."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
COMMON = ["benchmark", "peak_memory_mb", "device", "threads", "load_average"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, argv, capsys):
    result = load(name).main(argv + ["--threads", "1", "--repeats", "1", "--warmup", "0"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))  # the last line is the JSON result
    assert result["benchmark"] == name
    assert all(k in result for k in COMMON), [k for k in COMMON if k not in result]
    assert result["threads"] == 1 and len(result["load_average"]) == 3
    return result


def test_decode(capsys):
    r = run("decode", ["--K", "2", "--n", "2", "--length", "4", "--batch", "2", "--naive-repeats", "1"], capsys)
    for k in ("tokens_per_s", "naive_tokens_per_s", "speedup"):
        assert r[k] > 0
    assert r["same_tokens"] is True
    assert r["tokens"] == 2 * 2 * 2 * 4  # images x layers x beams x length: every caption ran to --length


def test_step(capsys):
    r = run("step", ["--K", "2", "--n", "2", "--length", "4", "--batch", "2", "--reward", "free"], capsys)
    for k in ("ratio", "floor", "floor_with_reward", "peak_memory_mb_small", "peak_memory_mb_large"):
        assert isinstance(r[k], float), k
    assert r["ratio"] > 0 and r["floor"] > 1
    assert (r["kn_small"], r["kn_large"]) == (2, 4)
    assert {"generation", "reward", "policy_forward", "policy_backward", "reference_forward"} <= set(r["breakdown_s"])


def test_reward(capsys):
    r = run("reward", ["--layers", "2", "--n", "2", "--batch", "2", "--rollouts", "1"], capsys)
    for k in ("student_pairs_per_s", "teacher_pairs_per_s", "student_speedup", "dedup_speedup_student",
              "dedup_speedup_teacher"):
        assert r[k] > 0, k
    assert r["dedup_scores_equal"] is True
    assert r["pairs"] == 2 * 2 * 2 and 0 < r["unique_fraction"] <= 1


def test_realsize(capsys):
    """The real-size benchmark at toy sizes (the same code; sizes are flags): its keys and breakdown."""
    r = run("realsize", ["--quick", "--K", "2", "--n", "2", "--max-len", "5", "--d-model", "64", "--slots", "4",
                         "--heads", "2", "--readout-layers", "1", "--encoder", "tiny_vit", "--image-size", "32",
                         "--reward-model", "tiny", "--student-width", "32", "--student-layers", "1",
                         "--student-heads", "2", "--itm-size", "tiny", "--memory"], capsys)
    for k in ("decode_vs_generate", "student_speedup", "dico_over_floor", "ratio", "floor", "reward_share", "itm_over_pacs",
              "student_speedup_over_itm"):
        assert isinstance(r[k], float) and r[k] > 0, k
    costs = r["cost_per_caption_ms"]
    assert set(costs) == {"pacs", "text_student", "blip_itm"} and all(v > 0 for v in costs.values())
    assert costs["pacs"] / costs["text_student"] == pytest.approx(r["student_speedup"], rel=0.05)  # one call, one count
    # at toy sizes one more image can stay under the allocator's granularity (the CI run once read 0.0 MB)
    assert isinstance(r["memory_per_image_mb"], float) and r["memory_per_image_mb"] >= 0
    assert {"generation", "reward", "policy_forward", "policy_backward", "reference_forward"} <= set(r["breakdown_s"])
    assert r["decode_tokens"] == 1 * 2 * 2 * 4  # images x layers x beams x (max_len - 1), both decoders
    assert r["reward_pairs"] == 1 * (2 * 2 + 2)  # K*n candidates + the two greedy anchors per image
    # no per-image slope at toy sizes -> no batch projection
    assert r["max_batch_141gb"] is None if r["memory_per_image_mb"] == 0 else isinstance(r["max_batch_141gb"], int)
