"""`mixed_precision: auto`: bf16 only where the hardware multiplies in it."""

import pytest
import torch

from clue_mtl import hardware


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, fast, expected):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"   # an explicit choice stands
    assert hardware.resolve_precision("no", "cpu") == "no"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_does_not_count_emulated_bf16(monkeypatch, native, expected):
    seen = {}

    def supported(including_emulation=True):
        seen["including_emulation"] = including_emulation
        return native or including_emulation   # an old GPU: "supported" only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert hardware.resolve_precision("auto", "cuda") == expected
    assert seen["including_emulation"] is False


def test_the_trainer_runs_at_the_resolved_precision(tiny_config, monkeypatch):
    from clue_mtl.recipes.multitask import Trainer

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    trainer = Trainer(tiny_config("train.mixed_precision=auto"), show_progress=False)
    assert trainer.accelerator.mixed_precision == "no"
