"""notebooks/quickstart.ipynb: committed clean, and it runs top to bottom on a tiny run."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
MEMBERS = ["ocemotion_predict.json", "ocnli_predict.json", "tnews_predict.json"]


def test_quickstart_is_committed_without_outputs():
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert [cell for cell in code if "parameters" in cell.metadata.get("tags", [])] == [code[0]]


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch) -> str:
    """A `python3` kernelspec that runs this interpreter, first on JUPYTER_PATH.

    Without it `python3` resolves to whatever spec comes first on Jupyter's path, and a user-level
    one (~/.local/share/jupyter/kernels/python3) may name another Python without this venv's packages.
    """
    from ipykernel.kernelspec import write_kernel_spec

    jupyter_dir = tmp_path / "jupyter"
    spec = write_kernel_spec(jupyter_dir / "kernels" / "python3")  # argv[0] is sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    assert json.loads((Path(spec) / "kernel.json").read_text())["argv"][0] == sys.executable
    return "python3"


@pytest.mark.slow
def test_quickstart_runs_a_tiny_run_to_a_valid_zip(data_dir, tiny_bert, tmp_path, python3_kernel):
    from nbclient import NotebookClient

    nb = nbformat.read(QUICKSTART, as_version=4)
    position = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = {
        "data.max_train_rows": 48, "data.max_dev_rows": 24, "data.max_length": 32,
        "train.steps": 4, "train.batch_size": 9, "train.eval_every": 2, "train.log_every": 1,
        "train.lr": 1e-3, "train.warmup_ratio": 0.25,
    }
    nb.cells.insert(position + 1, nbformat.v4.new_code_cell("\n".join([
        f"DATA_DIR = {str(data_dir)!r}",
        f"ENCODER = {str(tiny_bert)!r}",
        f"OUTPUT_DIR = {str(tmp_path / 'runs')!r}",
        f"SUBMISSION_DIR = {str(tmp_path / 'submissions')!r}",
        f"BLEND_DIR = {str(tmp_path / 'blends')!r}",
        "RUN_NAME = 'tiny'",
        "RUN_BASELINE = True",
        f"OVERRIDES = {overrides!r}",
    ])))
    NotebookClient(nb, timeout=600, kernel_name=python3_kernel,
                   resources={"metadata": {"path": tmp_path}}).execute()

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert (tmp_path / "runs" / "tiny" / "evaluation" / "report.json").is_file()
    assert (tmp_path / "runs" / "baseline" / "baseline.json").is_file()
    assert (tmp_path / "blends" / "tiny" / "evaluation" / "blend.png").stat().st_size > 1000
    tables = [output["data"]["text/plain"] for cell in nb.cells if cell.cell_type == "code"
              for output in cell.outputs if "text/plain" in output.get("data", {})]
    assert any("member weight" in table and "baseline" in table for table in tables)
    with zipfile.ZipFile(tmp_path / "submissions" / "tiny-test-a.zip") as archive:
        assert sorted(archive.namelist()) == MEMBERS


WEIGHTING = ROOT / "notebooks" / "weighting.ipynb"


def _comparison_record(methods: list[str]) -> dict:
    steps = [0, 20, 40]
    figures = {}
    for k, method in enumerate(methods):
        figures[method] = {
            str(seed): {"mean": 0.4 + 0.01 * k + 0.005 * seed, "step": 40, "seconds": 120.0,
                        "macro_f1": {"ocnli": 0.5, "ocemotion": 0.3 + 0.01 * k, "tnews": 0.4},
                        "weights": {"step": steps, "weights": {t: [1.0, 1.0 + k / 10, 1.0 - k / 10] for t in ("ocnli", "tnews")},
                                    "loss": {t: [1.0, 0.9, 0.8] for t in ("ocnli", "tnews")}}}
            for seed in (1, 2)
        }
    return {"command": "python -m benchmarks.dev_comparison weighting", "machine": {"cpu": "test"}, "figures": figures}


def test_weighting_notebook_is_committed_without_outputs():
    nb = nbformat.read(WEIGHTING, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_weighting_notebook_draws_the_comparison_and_a_run(tmp_path, python3_kernel):
    from nbclient import NotebookClient

    comparison = tmp_path / "compare.json"
    comparison.write_text(json.dumps(_comparison_record(["equal", "uncertainty", "dwa"])))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(record) for record in [
        {"kind": "train", "step": 10, "loss": {"ocnli": 1.0}, "weights": {"ocnli": 1.0}},
        {"kind": "train", "step": 20, "loss": {"ocnli": 0.8}, "weights": {"ocnli": 1.2}},
        {"kind": "eval", "step": 20, "mean_macro_f1": 0.4, "macro_f1": {"ocnli": 0.4}}]) + "\n")
    nb = nbformat.read(WEIGHTING, as_version=4)
    position = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    nb.cells.insert(position + 1, nbformat.v4.new_code_cell(
        f"COMPARISON = {str(comparison)!r}\nOVERHEAD = {str(tmp_path / 'missing.json')!r}\nRUN_DIR = {str(run_dir)!r}\n"
        f"FIGURE_OUT = {str(tmp_path / 'methods.png')!r}"))
    NotebookClient(nb, timeout=600, kernel_name=python3_kernel, resources={"metadata": {"path": ROOT}}).execute()

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 3  # seeds, weights, the run
    text = "".join(output.get("text", "") for output in outputs)
    assert "missing.json not found" in text
    assert (run_dir / "evaluation" / "training.png").is_file()
    assert (tmp_path / "methods.png").stat().st_size > 0
    tables = [output["data"]["text/plain"] for output in outputs if "text/plain" in output.get("data", {})]
    assert any("uncertainty" in table and "spread over seeds" in table for table in tables)
