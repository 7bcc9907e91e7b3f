"""Every kept benchmark script run for a couple of steps with `--smoke`: a tiny random encoder and
generated competition files in place of e5-small and the data, its benchmark children in one
process and its kit commands forked (benchmarks/processes.py), and its results written under the
test's folder (BENCHMARK_RESULTS), never into benchmarks/results. Each script runs as a fork of the
test process (tests/forked.py). cpu_budget.py and gpu_check.py have their own files
(test_cpu_budget.py, test_gpu_check.py)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from forked import run_module

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # every test starts processes


def run_benchmark(results: Path, name: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.NAME --smoke ARGUMENTS` with its results in `results`; the finished process."""
    environment = {**os.environ, "BENCHMARK_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    result = run_module(f"benchmarks.{name}", ["--smoke", *arguments], cwd=ROOT, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def record(results: Path, name: str) -> dict:
    record = json.loads((results / f"{name}.json").read_text())
    assert record["command"].startswith("python") and "-m benchmarks." in record["command"]
    assert (results / f"{name}.md").read_text().startswith("# ")
    return record["figures"]


def test_weighting_overhead(tmp_path):
    run_benchmark(tmp_path, "weighting_overhead", "--steps", "2", "--warmup", "0", "--repeats", "1")
    figures = record(tmp_path, "weighting_overhead")
    assert set(figures) == {"equal", "uncertainty", "dwa", "dtp", "gradnorm", "pcgrad", "mgda", "famo"}
    assert figures["equal"]["overhead"] == 0 and all(f["step_seconds"] > 0 for f in figures.values())


def test_train_throughput(tmp_path):
    run_benchmark(tmp_path, "train_throughput", "--steps", "2", "--warmup", "0", "--repeats", "1")
    figures = record(tmp_path, "train_throughput")
    assert set(figures) >= {"variants", "profile", "peak", "settings", "speedup_after_over_before"}
    assert len(figures["variants"]) == 6 and all(v["model_flops_per_step"] > 0 for v in figures["variants"].values())
    assert figures["profile"]["step_seconds_profiled"] > 0 and figures["peak"]["float32"]["square"] > 0


def test_step_experiments(tmp_path):
    run_benchmark(tmp_path, "step_experiments", "--steps", "2", "--warmup", "0", "--repeats", "1")
    figures = record(tmp_path, "step_experiments")
    assert set(figures) == {"variants", "flash_profile"}
    assert "one encoder pass over all tasks' rows" in figures["variants"]          # the kit's joint pass, no patch
    assert not any("compile" in name for name in figures["variants"])             # nothing compiled in a smoke run
    assert all(v["samples_per_second"] > 0 for v in figures["variants"].values())
    assert figures["flash_profile"]["top_operators"]


def test_main_job_runs_a_variant_and_compares_it_with_its_baseline(tmp_path):
    run_benchmark(tmp_path, "main_job", "run", "--config", "configs/quickstart.yaml", "--seed", "1", "--name", "smoke")
    run_benchmark(tmp_path, "main_job", "report", "--compare", "smoke@baseline", "smoke")
    figures = record(tmp_path, "main_job")
    entry = figures["smoke"]
    assert entry["steps"] == 2 and set(entry["members"]) >= {"baseline"}
    assert set(entry["biased_cross_fitted"]) == {"ocnli", "ocemotion", "tnews"}
    comparison = figures["_comparisons"]["smoke - smoke@baseline"]
    assert comparison["low"] <= comparison["difference"] <= comparison["high"]
    assert (tmp_path / "smoke-work" / entry["blend_dir"] / "dev.safetensors").exists()   # nothing under the repository


def test_quality(tmp_path):
    run_benchmark(tmp_path, "quality", "--config", "configs/quickstart.yaml")
    figures = record(tmp_path, "quality")
    assert set(figures) == {"baseline", "quickstart"}
    assert set(figures["quickstart"]["macro_f1"]) == {"ocnli", "ocemotion", "tnews"}
    assert 0 <= figures["baseline"]["mean"] <= 1 and figures["quickstart"]["seconds"] > 0


def test_pretrain_mlm(tmp_path):
    run_benchmark(tmp_path, "pretrain_mlm", "--config", "configs/pretrain-e5-small.yaml")
    figures = record(tmp_path, "pretrain_mlm")
    assert figures["before"]["step"] == 0 and figures["after"]["step"] == 2
    assert {"loss", "accuracy", "perplexity"} <= set(figures["after"])
    assert (tmp_path / "pretrain_mlm.png").stat().st_size > 0


def test_predict_memory(tmp_path):
    run_benchmark(tmp_path, "predict_memory", "--rows", "300", "--short-rows", "300")
    figures = record(tmp_path, "predict_memory")
    assert set(figures) == {"large file", "short rows"}
    assert all(f["rows"] == 300 and f["peak_rss_mb"] > 0 and f["rows_per_second"] > 0 for f in figures.values())


def test_predict_throughput(tmp_path):
    run_benchmark(tmp_path, "predict_throughput", "--repeats", "1")
    figures = record(tmp_path, "predict_throughput")
    assert figures["rows"] == 36 and figures["model_flops"] > 0        # 12 generated test rows a task
    assert len(figures["variants"]) == 2 and all(v["rows_per_second"] > 0 for v in figures["variants"].values())
    assert "forward passes" in figures["phases"]


def test_predict_experiments(tmp_path, tiny_bert, generated_data_dir):
    from clue_mtl.config import load_config
    from clue_mtl.recipes.multitask import train

    config = load_config(overrides=[f"data.data_dir={generated_data_dir}", f"model.encoder={tiny_bert}",
                                    "data.max_length=32", "train.steps=2", "train.eval_every=2", "train.batch_size=9"])
    train(config, tmp_path / "run", show_progress=False)
    run_benchmark(tmp_path, "predict_experiments", str(tmp_path / "run"), "--repeats", "1")
    figures = record(tmp_path, "predict_experiments")
    assert "kit before: float32 weights, bf16 autocast, 64 rows a batch" in figures and len(figures) >= 4
    for variant in figures.values():
        assert variant["rows_per_second"] > 0 and set(variant["dev_macro_f1"]) == {"ocnli", "ocemotion", "tnews"}


# a tiny XLM-R still carries e5's 250,002-piece tokenizer and embedding: over a minute
def test_trim_vocab(tmp_path):
    run_benchmark(tmp_path, "trim_vocab", "--steps", "2", "--warmup", "0", "--repeats", "1")
    figures = record(tmp_path, "trim_vocab")
    full, trimmed = figures["full vocabulary, embeddings trained"], figures["trimmed vocabulary, embeddings trained"]
    assert trimmed["vocabulary"] < full["vocabulary"] and trimmed["parameters"] < full["parameters"]
    assert all(f["samples_per_second"] > 0 for f in figures.values())


def test_static_compile(tmp_path):
    run_benchmark(tmp_path, "static_compile", "--steps", "2", "--warmup", "0")
    figures = record(tmp_path, "static_compile")
    assert set(figures) == {"kit after", "widths padded to a multiple of 32"}   # a smoke run compiles nothing
    assert figures["widths padded to a multiple of 32"]["padded_tokens_per_step"] % 32 == 0


def test_structures_speed_stage(tmp_path):
    run_benchmark(tmp_path, "structures", "speed", "--steps", "2", "--warmup", "0")
    record = json.loads((tmp_path / "structures_speed.json").read_text())
    assert "-m benchmarks.structures" in record["command"]
    speed = record["figures"]
    assert len(speed) == 8 and speed["default"]["equal_time_steps"] == 450
    assert all(0 < entry["equal_time_steps"] <= 450 and entry["parameters"] > 0 for entry in speed.values())


def test_encoder_choice_speed_stage(tmp_path):
    run_benchmark(tmp_path, "encoder_choice", "--steps", "2", "--warmup", "0", "speed", "--repeats", "1")
    record = json.loads((tmp_path / "encoder_choice_speed.json").read_text())
    assert "-m benchmarks.encoder_choice" in record["command"]
    assert set(record["figures"]) == {"e5-small", "m3e-small"}
    assert all(f["step_seconds"] > 0 for f in record["figures"].values())


def test_further_pretraining_speed_stage(tmp_path):
    run_benchmark(tmp_path, "further_pretraining", "speed", "--steps", "2", "--warmup", "0")
    record = json.loads((tmp_path / "further_pretraining_speed.json").read_text())
    assert "-m benchmarks.further_pretraining" in record["command"]
    figures = record["figures"]
    assert set(figures["finetune"]) == {"none", "auxiliary MLM (8 texts a step, annealed)", "m3e-small: none"}
    assert set(figures["pretrain"]) == {"plain", "encoder frozen", "pairs", "m3e-small: plain",
                                        "m3e-small: encoder frozen"}
    assert all(f["step_seconds"] > 0 and f["eval_seconds"] > 0 for f in figures["pretrain"].values())


def test_dev_comparison(tmp_path):
    run_benchmark(tmp_path, "dev_comparison", "weighting", "--seeds", "1", "--variants", "equal")
    figures = record(tmp_path, "compare_weighting")
    run = figures["equal"]["1"]
    assert run["step"] == 2 and set(run["macro_f1"]) == {"ocnli", "ocemotion", "tnews"}
    assert run["weights"]["step"] and run["seconds"] > 0


# two main jobs and their ensembles first: five processes, minutes here
def test_shallow_encoder(tmp_path):
    for name, layers in (("full", []), ("shallow", ["--set", "model.num_layers=6"])):
        run_benchmark(tmp_path, "main_job", "run", "--config", "configs/quickstart.yaml", "--name", name, *layers)
        run_benchmark(tmp_path, "main_job", "ensemble", "--name", name, "--run", f"runs/main-{name}")
    run_benchmark(tmp_path, "shallow_encoder", "--full", "ensemble-full@main-full", "--shallow",
                  "ensemble-shallow@main-shallow", "--steps", "2", "--warmup", "0", "--repeats", "1")
    figures = record(tmp_path, "shallow_encoder")
    assert set(figures["speed"]) == {"12 layers", "bottom 6 layers"} and figures["ratio"] > 0
    assert set(figures["comparisons"]) == {"ensemble-shallow@main-shallow - ensemble-full@main-full",
                                           "ensemble-shallow - ensemble-full (biased blends)"}


def test_heads_long_trains_four_lanes_and_compares_heads_with_none_per_seed_and_pooled(tmp_path):
    first = run_benchmark(tmp_path, "heads_long")
    assert first.stdout.count("training in a lane") == 4
    figures = record(tmp_path, "heads_long")
    assert set(figures["runs"]) == {"heads-s42", "heads-s43", "none-s42", "none-s43"}
    heads = {name: yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())["model"]["heads"]
             for name, run in figures["runs"].items()}
    assert heads["heads-s42"]["tnews"]["type"] == "attention" and heads["none-s43"] == {}
    assert {key: set(comparison) for key, comparison in figures["heads_minus_none"].items()} == {
        key: {"s42", "s43", "both seeds"} for key in ("alone", "biased")}
    # which lanes overlapped depends on how the four processes were scheduled (two steps each here);
    # overlapping() itself is tested in test_lanes.py
    assert all(set(run["trained_beside"]) <= set(figures["runs"]) - {name} for name, run in figures["runs"].items())
    again = run_benchmark(tmp_path, "heads_long")   # every run finished: nothing trained again
    assert again.stdout.count("trained already") == 4 and "training in a lane" not in again.stdout
