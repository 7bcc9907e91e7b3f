"""Speed paths: the fused AdamW step, attention dropout and kernel, and the throughput meter of the progress bar."""

import json

import pytest
import torch

from clue_mtl import hardware
from clue_mtl.config import ConfigError, validate
from clue_mtl.recipes.multitask import Trainer


def read_train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def test_count_flops_counts_a_matrix_product():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    product, flops = hardware.count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4
    assert product.shape == (8, 4)


def test_the_matmul_rate_is_that_of_the_best_repeat_until_the_seconds_are_spent(monkeypatch):
    """Repeats of 4, 2 and 5 ms fill the 10 ms asked for: 2 x 64^3 FLOPs over the best, 2 ms."""
    readings = iter([0.0, 0.004, 1.0, 1.002, 2.0, 2.005])   # a start and a stop per repeat
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(readings))
    assert hardware.matmul_flops_per_second(64, 64, 64, seconds=0.01) == pytest.approx(2 * 64**3 / 0.002)
    with pytest.raises(StopIteration):   # no fourth repeat once 11 ms are spent
        next(readings)


def test_the_meter_reports_each_interval_once():
    meter = hardware.ThroughputMeter(rows_per_step=10, peak=1000.0)
    assert meter.report() == {}
    meter.count(flops=500, tokens=100)              # 5 FLOPs per token; that step is not timed
    meter.add(seconds=1.0, tokens=100)
    meter.add(seconds=1.0, tokens=300)
    figures = meter.report()
    assert figures["samples_per_second"] == pytest.approx(10.0)
    assert figures["model_flops_per_second"] == pytest.approx(5 * 400 / 2)
    assert figures["fraction_of_peak"] == pytest.approx(1.0)
    assert meter.report() == {}   # a new interval starts empty


def test_the_fused_optimizer_trains_as_the_loop_does(tiny_config):
    """Same arithmetic, one kernel: losses and weights agree with the per-tensor loop's."""
    results = {}
    for fused in (False, True):
        trainer = Trainer(tiny_config(f"train.fused_optimizer={str(fused).lower()}", "model.dropout=0.0",
                                      f"name=fused-{fused}"), show_progress=False)
        assert trainer.optimizer.optimizer.defaults["fused"] is (True if fused else None)
        losses = [sum(trainer.train_step()[0].values()).item() for _ in range(4)]
        results[fused] = losses, {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-4, atol=1e-5)


def test_no_fused_optimizer_under_fp16():
    """fp16's GradScaler would hide skipped steps from Accelerate behind a fused kernel."""
    from clue_mtl.training.optim import adamw

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert adamw(groups, device_type="cpu").defaults["fused"] is True
    assert adamw(groups, device_type="cpu", precision="bf16").defaults["fused"] is True
    assert not adamw(groups, device_type="cuda", precision="fp16").defaults["fused"]
    assert not adamw(groups, device_type="cpu", fused=False).defaults["fused"]


def test_attention_dropout_reaches_the_encoder(tiny_config):
    trainer = Trainer(tiny_config("model.attention_dropout=0.0"), show_progress=False)
    encoder = trainer.unwrapped.encoder
    assert encoder.config.attention_probs_dropout_prob == 0.0
    assert encoder.config.hidden_dropout_prob > 0   # the other dropouts stay
    attention = [m for m in encoder.modules() if type(m).__name__.endswith("SelfAttention")]
    assert attention and all(m.dropout.p == 0.0 for m in attention)


def test_attention_dropout_out_of_range_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="attention_dropout"):
        validate(tiny_config("model.attention_dropout=1.5"))


@pytest.mark.parametrize("setting, device, precision, math_only", [
    ("auto", "cpu", "bf16", True), ("auto", "cpu", "no", False), ("auto", "cuda", "bf16", False),
    ("math", "cuda", "bf16", True), ("torch", "cpu", "bf16", False),
])
def test_the_attention_kernel_setting_picks_the_math_kernel(setting, device, precision, math_only):
    """Inside the context, the fused kernels are switched off exactly where the math one is chosen."""
    with hardware.attention_kernel(setting, device, precision):
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() is not math_only
    assert torch.backends.cuda.flash_sdp_enabled()   # and back after it


def test_the_math_attention_kernel_trains_as_the_fused_one_does(tiny_config):
    """Same function, other kernel: a step's losses agree whichever kernel runs attention."""
    losses = {}
    for kernel in ("torch", "math"):
        trainer = Trainer(tiny_config(f"train.attention_kernel={kernel}", "model.dropout=0.0",
                                      "model.attention_dropout=0.0", f"name=kernel-{kernel}"), show_progress=False)
        losses[kernel] = [sum(trainer.train_step()[0].values()).item() for _ in range(3)]
    assert losses["math"] == pytest.approx(losses["torch"], rel=1e-4)


def test_an_unknown_attention_kernel_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="attention_kernel"):
        validate(tiny_config("train.attention_kernel=flash"))


def test_the_progress_bar_shows_rows_per_second_and_the_fraction_of_peak(tiny_config):
    trainer = Trainer(tiny_config("train.steps=3", "train.eval_every=100"), show_progress=True)
    trainer.train()
    records = read_train_records(trainer.run_dir)
    assert "samples_per_second" not in records[0]   # the first step is counted, not timed
    assert all(r["samples_per_second"] > 0 for r in records[1:])
    assert trainer.meter.flops_per_token > 0
    assert all(0 < r["fraction_of_peak"] <= 1 for r in records[1:])
    with trainer.meter.watching():   # one more step, watched as the loop watches it
        losses, total = trainer.train_step()
    trainer.meter.step_done(trainer.step_tokens)
    postfix = trainer._log_step(losses, total, 1.0)
    assert set(postfix) == {"ocnli", "ocemotion", "tnews", "rows/s", "peak"}
    assert float(postfix["rows/s"]) > 0 and postfix["peak"].endswith("%")
    quiet = Trainer(tiny_config("train.steps=2", "train.eval_every=100", "name=quiet"), show_progress=False)
    quiet.train()
    assert all("fraction_of_peak" not in r for r in read_train_records(quiet.run_dir))


def test_a_shallower_encoder_trains_saves_and_reloads(tiny_config):
    from clue_mtl.model.encoders import encoder_layers
    from clue_mtl.errors import EncoderError
    from clue_mtl.model.multitask import MultiTaskModel

    from clue_mtl.model.encoders import load_encoder

    trainer = Trainer(tiny_config("model.num_layers=1", "train.steps=2"), show_progress=False)
    assert len(encoder_layers(trainer.unwrapped.encoder)) == 2   # embeddings and one layer
    full, _ = load_encoder(trainer.config.model.encoder)
    kept, bottom = encoder_layers(trainer.unwrapped.encoder)[1], encoder_layers(full)[1]
    for (name, value), (_, original) in zip(kept.state_dict().items(), bottom.state_dict().items()):
        assert torch.equal(value, original), name   # the bottom layer, not the top one
    trainer.train()
    reloaded = MultiTaskModel.load(trainer.run_dir / "best")
    assert reloaded.encoder.config.num_hidden_layers == 1
    assert len(encoder_layers(reloaded.encoder)) == 2
    with pytest.raises(EncoderError, match="num_layers is 99"):
        Trainer(tiny_config("model.num_layers=99", "name=too-deep"), show_progress=False)


def attention_backward_nodes(trainer) -> set[str]:
    """The names of the scaled-dot-product attention nodes in one training step's loss graphs."""
    graphs, forward_losses = [], trainer._forward_losses

    def recording(batches):
        losses, features, accuracies = forward_losses(batches)
        graphs.extend(loss.grad_fn for loss in losses.values())
        return losses, features, accuracies
    trainer._forward_losses = recording
    trainer.train_step()
    names, seen, stack = set(), set(), list(graphs)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Attention" in type(node).__name__:
            names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("setting,precision,flash", [
    ("torch", "no", True), ("math", "no", False), ("auto", "no", True), ("auto", "bf16", False)])
def test_the_training_step_runs_attention_in_the_chosen_kernel(tiny_config, setting, precision, flash):
    """Through the Trainer: the fused kernel's backward is in the step's graph unless the math
    kernel was chosen (the setting is applied around the step, not only in `hardware`)."""
    trainer = Trainer(tiny_config(f"train.attention_kernel={setting}", f"train.mixed_precision={precision}",
                                  "model.attention_dropout=0.0"), show_progress=False)
    nodes = attention_backward_nodes(trainer)
    assert any("Flash" in name for name in nodes) is flash, nodes


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_a_loaded_run_predicts_with_its_weights_cast_to_bf16_once(tiny_config, monkeypatch, fast_bf16):
    import numpy as np

    from clue_mtl.data.folder import load_split
    from clue_mtl.predict.inference import LoadedRun

    trainer = Trainer(tiny_config("train.steps=3", "train.mixed_precision=auto"), show_progress=False)
    trainer.train()
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast_bf16)
    cast = LoadedRun(trainer.run_dir, "cpu", show_progress=False)
    kept = LoadedRun(trainer.run_dir, "cpu", show_progress=False, float32_weights=True)
    expected = torch.bfloat16 if fast_bf16 else torch.float32   # no bf16 where the machine emulates it
    assert cast.bf16 is fast_bf16
    assert {p.dtype for p in cast.model.parameters()} == {expected}
    assert {p.dtype for p in kept.model.parameters()} == {torch.float32}
    frame = load_split(trainer.config.data.data_dir, "tnews", "a").head(40)
    cast_probabilities, kept_probabilities = cast.probabilities("tnews", frame), kept.probabilities("tnews", frame)
    np.testing.assert_allclose(cast_probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cast_probabilities, kept_probabilities, atol=0.02)
    if not fast_bf16:
        np.testing.assert_array_equal(cast_probabilities, kept_probabilities)   # one path
