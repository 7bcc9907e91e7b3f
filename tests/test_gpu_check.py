"""benchmarks/gpu_check.py on the CPU: every stage the GPU command runs (device tests, the main
job by the clock, the weighting methods side by side, the record), so that no device minute is
spent finding a bug this machine could have found; and `pack`'s carried folder."""

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from forked import run_module
from safetensors import safe_open

from clue_mtl.model.encoders import load_encoder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # every test starts processes


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return run_module("benchmarks.gpu_check", list(arguments), cwd=ROOT, timeout=900)


def test_the_smoke_run_goes_through_every_stage_and_records_them(tmp_path):
    result = run_script("run", "--smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
                        "--out", str(tmp_path / "out"), "--minutes", "0.1", "--compare-minutes", "0.05",
                        "--device-tests", "fused or fp16", "--deadline", "30")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    figures = record["figures"]
    assert figures["smoke"] and figures["failed"] == {} and figures["skipped"] == {}
    assert record["machine"]["torch"] == torch.__version__
    tests = figures["device_tests"]
    assert tests["passed"] == 2 and tests["failures"] == tests["errors"] == 0   # fused AdamW, fp16 refused on a CPU
    job = figures["main_job"]
    assert job["baseline_reused"]   # fitted beside the device tests, not again
    assert job["training"]["steps"] > 0 and job["training"]["samples_per_second"] > 0
    assert job["training"]["budget"]["minutes"] == 0.1 and job["training"]["budget"]["total_steps"] == job["training"]["steps"]
    assert set(job["dev"]) == {"gpu", "baseline", "biased_blend_cross_fitted"}
    assert all(0 <= scores["mean"] <= 1 for scores in job["dev"].values())
    assert {name: z["validated"] for name, z in job["zips"].items()} == {
        "gpu-e5-small-test-a.zip": True, "gpu-e5-small-test-b.zip": True}
    weighting = figures["weighting"]
    assert set(weighting["dev"]) == {"equal", "uncertainty", "gradnorm", "dwa"}
    for against in weighting["against_equal"].values():
        assert against["low"] <= against["difference"] <= against["high"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "device-tests.xml", "gpu_check.json", "gpu_check.md", "main-job.log"]
    assert "## Main job" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_failing_stage_is_recorded_and_what_ran_still_comes_back(tmp_path):
    result = run_script("run", "--smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
                        "--out", str(tmp_path / "out"), "--device-tests", "fused", "--compare-minutes", "0.05",
                        "--config", str(tmp_path / "no-such-config.yaml"))
    assert result.returncode == 1
    figures = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["figures"]
    assert figures["device_tests"]["passed"] >= 1 and figures["device_tests"]["failures"] == 0
    assert set(figures["failed"]) == {"main job", "weighting methods"}
    assert "no-such-config.yaml" in figures["failed"]["main job"]
    assert "main job" in figures["stages_seconds"]


def test_pack_carries_the_nine_files_and_the_encoder_in_bf16(tmp_path, generated_data_dir, tiny_bert):
    out = tmp_path / "carry"
    result = run_script("pack", "--encoder", str(tiny_bert), "--data-dir", str(generated_data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    with tarfile.open(out / "data.tar.xz") as tar:
        assert sorted(tar.getnames()) == sorted(path.name for path in generated_data_dir.iterdir())
    with safe_open(out / "encoder" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    model, _ = load_encoder(out / "encoder")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    sizes = json.loads(result.stdout[:result.stdout.index("}") + 1])
    assert sizes["total_mib"] == pytest.approx(sizes["tree_mib"] + sizes["carry_mib"])
    assert "carry=['" in result.stdout
