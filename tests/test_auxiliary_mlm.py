"""Masked LM as an auxiliary fourth task of multi-task training (`auxiliary_mlm:`)."""

import pytest
import torch

from clue_mtl.config import ConfigError
from clue_mtl.predict.inference import LoadedRun
from clue_mtl.runs.folder import RunFolder
from clue_mtl.recipes.multitask import Trainer
from clue_mtl.weighting import METHODS

AUXILIARY = ("auxiliary_mlm.batch_size=4", "auxiliary_mlm.max_texts=300")
PARAMS = {"dwa": "weighting.params={window: 1}", "fixed": "weighting.params={weights: {mlm: 0.5}}"}
LEARNED = {"uncertainty", "gradnorm", "dwa", "dtp", "famo", "mgda"}  # weights that move during training


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_masked_lm_enters_every_weighting_method(tiny_config, method):
    """A fourth loss and weight in every record, for every method; weights that are not learned stay put."""
    trainer = Trainer(tiny_config(f"weighting.method={method}", "train.steps=2", "train.eval_every=2", *AUXILIARY,
                                  *([PARAMS[method]] if method in PARAMS else [])), show_progress=False)
    assert trainer.weighting.tasks == ["ocnli", "ocemotion", "tnews", "mlm"]
    trainer.train()
    records = [m for m in RunFolder(trainer.run_dir).metrics() if m["kind"] == "train"]
    assert all(set(m["loss"]) == set(m["weights"]) == {"ocnli", "ocemotion", "tnews", "mlm"} for m in records)
    # a vocabulary-wide guess (633 pieces, ln 633 = 6.45) by an untrained head, not a 3-way one
    assert all(5.5 < m["loss"]["mlm"] < 7.5 for m in records)
    assert all(w >= 0 for m in records for w in m["weights"].values())  # MGDA's may be 0
    if method not in LEARNED:
        assert all(m["weights"] == records[0]["weights"] for m in records)


@pytest.mark.parametrize("method", ["gradnorm", "pcgrad"])  # loss-level and gradient-level
def test_a_run_with_the_masked_lm_resumes_exactly(tiny_config, tmp_path, method):
    """Interrupted at step 2, the run ends where the straight one does: weights, the masked-LM
    head, the weighting's state and the metrics log."""
    config = tiny_config(f"weighting.method={method}", "train.steps=4", "train.eval_every=4", *AUXILIARY)
    straight = Trainer(config, tmp_path / "straight", show_progress=False)
    straight.train()
    Trainer(config, tmp_path / "resumed", show_progress=False).train(until_step=2)
    resumed = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False)
    resumed.train()
    expected = straight.model.state_dict()
    assert any(k.startswith("mlm_head.") for k in expected)
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    for name, tensor in resumed.weighting.state_dict().items():
        assert torch.equal(tensor, straight.weighting.state_dict()[name]), name
    assert RunFolder(tmp_path / "straight").metrics(timings=False) == RunFolder(tmp_path / "resumed").metrics(timings=False)


def test_the_masked_lm_alone_moves_the_shared_encoder_through_its_tied_head(tiny_config):
    trainer = Trainer(tiny_config(*AUXILIARY, "weighting.method=fixed",
                                  "weighting.params={weights: {ocnli: 0, ocemotion: 0, tnews: 0, mlm: 1}}"),
                      show_progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.mlm_head.predictions.decoder.weight is model.model.encoder.get_input_embeddings().weight
    batches = trainer._micro_batches(0)
    losses, _, accuracies = trainer._forward_losses(batches)
    assert 0 <= float(accuracies["mlm"]) <= 1
    losses["mlm"].backward()
    layer = model.model.encoder.encoder.layer[0].attention.self.query.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.heads.parameters())


def test_annealing_scales_the_masked_lm_loss_to_zero(tiny_config):
    trainer = Trainer(tiny_config(*AUXILIARY, "auxiliary_mlm.anneal=linear"), show_progress=False)
    trainer.model.eval()
    batch = trainer._micro_batches(0)["mlm"]
    for step, factor in ((0, 1.0), (3, 0.5), (5, 1 / 6)):
        trainer.state.step = step
        trainer.config.auxiliary_mlm.anneal = "none"
        full = trainer._masked_lm_loss(batch)[0]
        trainer.config.auxiliary_mlm.anneal = "linear"
        assert torch.allclose(trainer._masked_lm_loss(batch)[0], full * factor, rtol=1e-6)


def test_the_best_model_predicts_without_the_auxiliary_head(tiny_config):
    trainer = Trainer(tiny_config(*AUXILIARY), show_progress=False)
    trainer.train()
    run = LoadedRun(trainer.run_dir, show_progress=False)
    assert not any("mlm" in name for name, _ in run.model.named_parameters())
    checkpoint = RunFolder(trainer.run_dir).path / "checkpoint-6" / "model.safetensors"
    from safetensors.torch import load_file

    assert any(key.startswith("mlm_head.") for key in load_file(checkpoint))


@pytest.mark.parametrize("override, message", [
    ("auxiliary_mlm.batch_size=-1", "batch_size"),
    ("auxiliary_mlm.anneal=cosine", "none or linear"),
    ("auxiliary_mlm.mlm_probability=1.5", "mlm_probability"),
])
def test_auxiliary_config_errors(tiny_config, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)
