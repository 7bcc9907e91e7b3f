"""benchmarks/cpu_budget.py on a tiny encoder and generated data: a curve's points at training
minutes, a killed curve going on from its last point, and the report (table, figure, crossing)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from forked import run_module

from benchmarks import cpu_budget

ROOT = Path(__file__).resolve().parents[1]


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return run_module("benchmarks.cpu_budget", list(arguments), cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_a_curve_reads_points_goes_on_after_a_stop_and_reports(tmp_path):
    common = ["--smoke", "--variant", "default", "--run-root", str(tmp_path / "runs"), "--results", str(tmp_path)]
    first = run_script("curve", *common, "--minutes", "0.02")
    assert first.returncode == 0, first.stderr[-3000:]
    record_path = tmp_path / "cpu_budget_runs" / "default-s42.json"
    later = round(json.loads(record_path.read_text())["points"][0]["training_minutes"] + 0.05, 3)
    second = run_script("curve", *common, "--minutes", f"0.02,{later}")   # the first point is not read again
    assert second.returncode == 0, second.stderr[-3000:]
    points = json.loads(record_path.read_text())["points"]
    assert [p["target_minutes"] for p in points] == [0.02, later]
    assert points[0]["training_minutes"] >= 0.02 and points[1]["training_minutes"] >= later
    assert points[1]["step"] > points[0]["step"]   # trained on from the checkpoint of the first point
    for point in points:
        assert set(point["alone"]) == set(point["biased_blend_cross_fitted"]) == {"ocnli", "ocemotion", "tnews", "mean"}
        assert len(point["decisions"]["tnews"]["alone"]) == len(point["decisions"]["tnews"]["biased"]) > 0

    best = {"biased_blend_cross_fitted": {"mean": 0.61}, "alone": {"e5": {"mean": 0.5}}, "wall_minutes": 99.0}
    (tmp_path / "cpu_best.json").write_text(json.dumps({"command": "python -m benchmarks.cpu_best", "figures": {
        **best, "stage_minutes": {"lanes": 90.0, "baseline": 1.0, "blend": 4.0, "zips": 4.0}}}))
    report = run_script("report", "--results", str(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    figures = json.loads((tmp_path / "cpu_budget.json").read_text())["figures"]
    assert figures["cpu_best"] == {**best, "command": "python -m benchmarks.cpu_best", "lane_minutes": 90.0}
    assert figures["baseline"] == points[0]["baseline"]["mean"]
    assert [p["step"] for p in figures["curves"]["default-s42"]["points"]] == [p["step"] for p in points]
    assert (tmp_path / "cpu_budget.png").stat().st_size > 0
    assert "default-s42" in (tmp_path / "cpu_budget.md").read_text()


def test_the_crossing_minute_is_read_between_points():
    points = [{"training_minutes": m, "alone": {"mean": v}} for m, v in ((10, 0.40), (20, 0.50), (30, 0.60))]
    assert cpu_budget.crossing(points, 0.55) == pytest.approx(25.0)
    assert cpu_budget.crossing(points, 0.30) == 10
    assert cpu_budget.crossing(points, 0.70) is None


def test_decisions_are_stored_one_character_a_row():
    labels = [0, 9, 10, 14, 3]
    assert cpu_budget.encode_labels(labels) == "09ae3"
    assert cpu_budget.decode_labels("09ae3").tolist() == labels


@pytest.mark.slow
def test_a_frozen_curve_trains_from_its_store(tmp_path):
    result = run_script("curve", "--smoke", "--variant", "frozen8", "--set", "model.frozen_layers=1",
                        "--run-root", str(tmp_path / "runs"), "--results", str(tmp_path), "--minutes", "0.02")
    assert result.returncode == 0, result.stderr[-3000:]
    point = json.loads((tmp_path / "cpu_budget_runs" / "frozen8-s42.json").read_text())["points"][0]
    assert point["step"] >= cpu_budget.CALIBRATION_STEPS
    assert list((tmp_path / "runs" / "frozen8-s42" / "cache").rglob("states-0.bin"))


def test_a_curve_is_compared_with_the_default_of_its_seed_at_each_shared_minute():
    gold = {"ocnli": "0120", "ocemotion": "0123456", "tnews": "0123"}
    rows = {task: {"gold": labels, "baseline": labels} for task, labels in gold.items()}

    def run(variant, points):
        return {"variant": variant, "seed": 1, "dev_rows": rows, "points": [
            {"target_minutes": minute, "decisions": {task: {"alone": alone(task), "biased": gold[task]} for task in gold}}
            for minute, alone in points]}

    right, wrong = (lambda task: gold[task]), (lambda task: "0" * len(gold[task]))
    runs = {"default-s1": run("default", [(10, wrong), (20, wrong)]), "frozen8-s1": run("frozen8", [(10, right)])}
    comparisons = cpu_budget.compare_with_default(runs)
    assert list(comparisons) == ["frozen8-s1"] and list(comparisons["frozen8-s1"]) == [10]
    at_ten = comparisons["frozen8-s1"][10]
    assert at_ten["alone"]["difference"] > 0.5 and at_ten["biased"]["difference"] == 0.0


@pytest.mark.slow
def test_a_confirmation_trains_its_own_schedule_and_is_compared_with_the_default_of_that_budget(tmp_path):
    common = ["--smoke", "--run-root", str(tmp_path / "runs"), "--results", str(tmp_path), "--minutes", "0.03"]
    for variant in ("default", "frozen8"):
        extra = ["--set", "model.frozen_layers=1"] if variant == "frozen8" else []
        result = run_script("confirm", "--variant", variant, *extra, *common)
        assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "cpu_budget_runs" / "frozen8-own0.03-s42.json").read_text())
    assert record["reference"] == "default-own0.03-s42"
    assert "train.max_minutes=0.03" in record["overrides"] and not any("constant" in o for o in record["overrides"])
    budget = json.loads((tmp_path / "runs" / "frozen8-own0.03-s42" / "budget.json").read_text())
    (point,) = record["points"]
    assert point["step"] == budget["total_steps"]   # trained to the end of the total its clock fixed
    report = run_script("report", "--results", str(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    figures = json.loads((tmp_path / "cpu_budget.json").read_text())["figures"]
    assert set(figures["against_default"]["frozen8-own0.03-s42"]) == {"0.03"}


@pytest.mark.slow
def test_the_three_hour_recipe_trains_two_lanes_blends_them_with_the_baseline_and_is_reported(tmp_path):
    environment = {**os.environ, "BENCHMARK_RESULTS": str(tmp_path)}
    def run_recipe() -> subprocess.CompletedProcess:
        return run_module("benchmarks.cpu_best", ["--smoke"], cwd=ROOT, env=environment, timeout=600)

    first = run_recipe()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((tmp_path / "cpu_best.json").read_text())
    figures = record["figures"]
    assert set(figures["alone"]) == {"e5", "m3e", "baseline"}
    assert set(figures["biased_blend_cross_fitted"]) == {"ocnli", "ocemotion", "tnews", "mean"}
    assert list(figures["stage_minutes"]) == ["lanes", "baseline", "blend", "zips"]
    assert figures["wall_minutes"] == pytest.approx(sum(figures["stage_minutes"].values()))
    assert figures["zip_rows"]["a"] > 0 and figures["zip_rows"]["b"] > 0
    runs = tmp_path / "smoke-work" / "runs" / "cpu-best"
    assert (runs / "e5" / "best").is_dir() and (runs / "m3e" / "best").is_dir()

    again = run_recipe()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "e5: trained already" in again.stdout and "m3e: trained already" in again.stdout
    assert all(f"{stage}: done already" in again.stdout for stage in ("baseline", "blend", "zips"))
    second = json.loads((tmp_path / "cpu_best.json").read_text())["figures"]
    assert second["stage_minutes"] == figures["stage_minutes"]   # the minutes of the stages when they ran
    assert set(second["pairs_and_members"]) == {"e5 + m3e", "e5 + baseline", "m3e + baseline", "e5 alone",
                                                "m3e alone", "baseline alone"}

    (runs / "blend" / "blend.json").unlink()   # a stage done again: every later one is done again on its output
    third = run_recipe()
    assert third.returncode == 0, third.stderr[-3000:]
    assert "baseline: done already" in third.stdout and "zips: done already" not in third.stdout


def test_a_confirmation_at_two_budgets_is_refused_in_one_line(tmp_path):
    result = run_script("confirm", "--smoke", "--variant", "default", "--minutes", "10,30",
                        "--run-root", str(tmp_path / "runs"), "--results", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: confirm trains at one budget; --minutes 10,30 names 2"
    assert not (tmp_path / "runs").exists()   # refused before any input was written
