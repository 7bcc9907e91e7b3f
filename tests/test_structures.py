"""Per-task model structures: config strictness, the SAN module, shared-private parts, training
through the real Trainer with every weighting method, exact resume, saving and loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clue_mtl import hardware
from clue_mtl.predict.averaging import average_weights
from clue_mtl.config import load_config
from clue_mtl.data.folder import load_split
from clue_mtl.errors import AveragingError, ConfigError
from clue_mtl.model.features import LayerFeatures
from clue_mtl.model.heads import AnswerHead
from clue_mtl.predict.inference import LoadedRun, float32_modules
from clue_mtl.model.multitask import MultiTaskModel, build_model, pair_segments
from clue_mtl.model.encoders import encoder_layers, load_encoder
from clue_mtl.training.optim import BY_RATE, multitask_rates, parameter_groups
from clue_mtl.model.pooling import POOLINGS
from clue_mtl.config.structure import POOLING_NAMES, resolve_heads
from clue_mtl.runs.folder import RunFolder
from clue_mtl.recipes.multitask import Trainer
from clue_mtl.weighting import METHODS

# Every head type, feature kind and private part, spread over the three tasks in two mixes.
MIXES = {
    "mixed": ["model.heads={ocnli: {type: san, steps: 3, features: scalar_mix}, "
              "ocemotion: {type: bilstm, hidden: 8, pooling: max}, "
              "tnews: {type: attention, heads: 2, features: concat, layers: 2, pooling: attention, samples: 2}}",
              "model.private={ocnli: {type: lora, rank: 4}, ocemotion: {type: layers, layers: 1}}"],
    "all private": ["model.heads={ocnli: {type: mlp, hidden: 8, samples: 3}, tnews: {features: scalar_mix}}",
                    "model.private={ocnli: {type: layers, layers: 1}, ocemotion: {type: layers, layers: 1}, "
                    "tnews: {type: layers, layers: 1}}", "model.task_pooling={ocemotion: first}"],
}
PARAMS = {"dwa": "weighting.params={window: 1}", "fixed": "weighting.params={weights: {ocnli: 2.0}}"}


def tiny_model(tiny_bert, *overrides: str, tasks=("ocnli", "ocemotion", "tnews")) -> MultiTaskModel:
    config = load_config(overrides=[f"model.encoder={tiny_bert}", "model.dropout=0.0", *overrides])
    encoder, tokenizer = load_encoder(config.model.encoder)
    torch.manual_seed(0)
    return build_model(encoder, list(tasks), config.model, sep_token_id=tokenizer.sep_token_id).eval()


def pair_batch(tiny_bert):
    _, tokenizer = load_encoder(tiny_bert)
    return dict(tokenizer(["今天天气很好", "他在看书"], ["天气不错啊真的", "书"], padding=True, return_tensors="pt"))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, message", [
    ("model.heads={ocnli: {type: linear, steps: 5}}", "steps do(es) not apply to a linear head"),
    ("model.heads={tnews: {type: san}}", "SAN answer module reads sentence pairs"),
    ("model.heads={ocnli: {type: lstm}}", "model.heads.ocnli.type must be one of"),
    ("model.heads={ocnli: {steps_: 5}}", "unknown key in model.heads.ocnli: model.heads.ocnli.steps_"),
    ("model.heads={ocnli: {features: last, layers: 2}}", "layers applies to features: concat only"),
    ("model.heads={ocnli: {samples: 0}}", "samples must lie in [1, 64]"),
    ("model.heads={cmnli: {type: linear}}", "model.heads names tasks not trained"),
    ("model.private={ocnli: {type: lora, layers: 2}}", "layers do(es) not apply to private lora"),
    ("model.private={ocnli: {type: adapters}}", "model.private.ocnli.type must be one of"),
    ("model.pooling=attn", "unknown pooling 'attn'"),
    ("model.task_pooling={ocnli: max}\nmodel.heads={ocnli: {type: san}}", "model.task_pooling.ocnli: a SAN head attends"),
])
def test_structure_settings_are_strict(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=override.split("\n"))
    assert message in str(error.value)


def test_model_wide_settings_are_the_defaults_of_every_head_entry():
    config = load_config(overrides=["model.head_hidden=8", "model.task_pooling={tnews: max}",
                                    "model.heads={tnews: {features: scalar_mix}, ocnli: {type: san}}"])
    heads = resolve_heads(config.model, config.data.tasks)
    assert heads["tnews"] == {"type": "mlp", "features": "scalar_mix", "pooling": "max", "samples": 1, "hidden": 8}
    assert heads["ocemotion"] == {"type": "mlp", "features": "last", "pooling": "mean", "samples": 1, "hidden": 8}
    assert heads["ocnli"] == {"type": "san", "features": "last", "samples": 1, "steps": 5, "step_dropout": 0.1}


def test_the_structure_module_names_the_poolings_the_pooling_module_has():
    assert set(POOLING_NAMES) == {*POOLINGS, "attention"}


@pytest.mark.parametrize("override, message", [
    ("model.private={ocnli: {type: layers, layers: 2}}", "the encoder has 2 layers: keep at least one shared"),
    ("model.heads={tnews: {features: concat, layers: 9}}", "concat of 9 layers"),
    ("model.heads={tnews: {type: attention, heads: 5}}", "needs features whose width (32) it divides"),
])
def test_structures_the_encoder_cannot_carry_are_config_errors(tiny_bert, override, message):
    with pytest.raises(ConfigError) as error:
        tiny_model(tiny_bert, override)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------------------ SAN
def test_san_shapes_and_step_dropout_in_training_only(tiny_bert):
    model = tiny_model(tiny_bert, "model.heads={ocnli: {type: san, steps: 4, step_dropout: 0.5}}", tasks=["ocnli"])
    head = model.heads["ocnli"]
    assert isinstance(head, AnswerHead)
    batch = pair_batch(tiny_bert)
    logits, state = model("ocnli", **batch)
    assert logits.shape == (2, 3) and state.shape == (2, 32)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(2), atol=1e-5)  # log of averaged probabilities
    assert torch.equal(model("ocnli", **batch)[0], logits)  # prediction: every step, no randomness
    assert head.step_mask(5, torch.device("cpu")).all()
    head.train()  # the rest of the model stays in eval: only the step dropout draws
    masks = [head.step_mask(200, torch.device("cpu")) for _ in range(2)]
    assert all(mask.any(1).all() for mask in masks)  # at least one step counts in every row
    # a step is dropped with 0.5 unless it is the forced one (1 in 4): 0.375 of all
    assert 0.3 < 1 - masks[0].float().mean().item() < 0.45
    draws = [model("ocnli", **batch)[0] for _ in range(8)]
    assert any(not torch.allclose(draw, logits) for draw in draws)
    head.step_dropout = 0.0
    assert torch.allclose(model("ocnli", **batch)[0], logits, atol=1e-6)


def test_pair_segments_from_segment_ids_or_the_first_separator():
    ids = torch.tensor([[0, 5, 6, 2, 2, 7, 8, 2, 1], [0, 5, 2, 2, 7, 2, 1, 1, 1]])  # XLM-R: <s> a </s></s> b </s> pad
    assert pair_segments(ids, None, sep_token_id=2).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1],
                                                                [0, 0, 0, 1, 1, 1, 1, 1, 1]]
    segments = torch.tensor([[0, 0, 1, 1]])
    assert torch.equal(pair_segments(ids[:, :4], segments, sep_token_id=None), segments)


# ------------------------------------------------------------------------------------------------ features
def test_scalar_mix_starts_as_the_mean_of_every_layer_and_concat_stacks_the_top():
    states = [torch.full((1, 2, 3), float(i)) for i in range(4)]
    assert torch.equal(LayerFeatures("scalar_mix", 3, 4)(states), torch.full((1, 2, 3), 1.5))
    assert LayerFeatures("concat", 3, 4, layers=2)(states)[0, 0].tolist() == [2, 2, 2, 3, 3, 3]


def test_every_layer_recorded_matches_the_encoders_own_hidden_states(tiny_bert):
    model = tiny_model(tiny_bert, tasks=["ocnli"])
    batch = pair_batch(tiny_bert)
    states = model.hidden_states("ocnli", **batch, every_layer=True)
    reference = model.encoder(**batch, output_hidden_states=True).hidden_states
    assert len(states) == len(reference) == 3
    assert all(torch.allclose(a, b) for a, b in zip(states, reference))


# ------------------------------------------------------------------------------------------------ shared-private
def test_private_layers_start_as_the_shared_ones_and_are_not_shared_parameters(tiny_bert):
    plain = tiny_model(tiny_bert, tasks=["ocnli", "tnews"])
    private = tiny_model(tiny_bert, "model.private={ocnli: {type: layers, layers: 1}}", tasks=["ocnli", "tnews"])
    private.load_state_dict(plain.state_dict(), strict=False)  # the same heads
    batch = pair_batch(tiny_bert)
    for task in ("ocnli", "tnews"):
        assert torch.allclose(private(task, **batch)[0], plain(task, **batch)[0], atol=1e-6)
    copies = {id(p) for p in private.private.parameters()}
    assert copies and not copies & {id(p) for p in private.shared_parameters()}
    assert copies <= {id(p) for p in private.task_parameters()}
    with torch.no_grad():
        for parameter in private.private.parameters():
            parameter.add_(0.1)
    assert torch.allclose(private("tnews", **batch)[0], plain("tnews", **batch)[0], atol=1e-6)
    assert not torch.allclose(private("ocnli", **batch)[0], plain("ocnli", **batch)[0], atol=1e-6)


def test_a_private_tasks_recorded_layers_are_those_of_an_encoder_with_its_copies(tiny_bert):
    import copy

    model = tiny_model(tiny_bert, "model.private={ocnli: {type: layers, layers: 1}}", tasks=["ocnli", "tnews"])
    with torch.no_grad():
        for parameter in model.private.parameters():
            parameter.mul_(1.5)
    reference = copy.deepcopy(model.encoder)
    reference.encoder.layer[-1] = copy.deepcopy(model.private.copies["ocnli"][0])
    batch = pair_batch(tiny_bert)
    states = model.hidden_states("ocnli", **batch, every_layer=True)
    expected = reference(**batch, output_hidden_states=True).hidden_states
    assert len(states) == len(expected) == 3
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(states, expected))
    assert not torch.allclose(states[-1], model.hidden_states("tnews", **batch)[-1])


@pytest.mark.parametrize("private", ["{ocemotion: {type: layers, layers: 1}}",
                                     "{ocnli: {type: lora, rank: 2}, tnews: {type: layers, layers: 1}}"])
def test_the_last_shared_layer_is_one_every_tasks_loss_reaches(tiny_bert, private):
    model = tiny_model(tiny_bert, f"model.private={private}").train()
    last = model.last_shared_layer_parameters()
    assert last and not {id(p) for p in last} & {id(p) for p in model.task_parameters()}
    batch = pair_batch(tiny_bert)
    for task in model.tasks:
        logits, _ = model(task, **batch)
        grads = torch.autograd.grad(logits.logsumexp(-1).sum(), last, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), task


def test_default_heads_keep_the_parameter_names_of_models_saved_before_structures(tiny_bert):
    linear = tiny_model(tiny_bert, tasks=["ocnli"])
    mlp = tiny_model(tiny_bert, "model.head_hidden=8", tasks=["ocnli"])
    head_keys = lambda model: sorted(k for k in model.state_dict() if k.startswith("heads."))  # noqa: E731
    assert head_keys(linear) == ["heads.ocnli.classifier.1.bias", "heads.ocnli.classifier.1.weight"]
    assert head_keys(mlp) == ["heads.ocnli.classifier.1.bias", "heads.ocnli.classifier.1.weight",
                              "heads.ocnli.classifier.4.bias", "heads.ocnli.classifier.4.weight"]


def test_when_every_task_has_private_top_layers_the_shared_top_is_cut(tiny_bert):
    model = tiny_model(tiny_bert, *MIXES["all private"])
    assert len(encoder_layers(model.encoder)) - 1 == 1  # 2 layers, the top one private to every task
    assert all(len(stack) == 3 for stack in model.encoder_stacks())
    # layer-wise decay: a private copy learns as the top layer it copies, the shared layer below it
    groups = parameter_groups(multitask_rates(model, lr=1.0, head_lr=10.0, layer_lr_decay=0.5), weight_decay=0.0,
                              layout=BY_RATE)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert {rate[id(p)] for p in model.private.copies["tnews"].parameters()} == {1.0}
    assert {rate[id(p)] for p in encoder_layers(model.encoder)[-1].parameters()} == {0.5}


def test_lora_adapters_are_each_tasks_own(tiny_bert):
    model = tiny_model(tiny_bert, "model.private={ocnli: {type: lora, rank: 2}, tnews: {type: lora, rank: 2}}",
                       tasks=["ocnli", "tnews", "ocemotion"])
    batch = pair_batch(tiny_bert)
    before = {task: model(task, **batch)[0] for task in model.tasks}
    adapters = [(n, p) for n, p in model.encoder.named_parameters() if "lora_" in n]
    assert adapters and all(p.requires_grad for _, p in adapters)
    assert not {id(p) for _, p in adapters} & {id(p) for p in model.shared_parameters()}
    assert all(p.requires_grad for p in model.shared_parameters())  # peft froze them; the kit trains them
    with torch.no_grad():
        for name, parameter in adapters:
            if "lora_B.ocnli" in name:
                parameter.add_(0.5)
    after = {task: model(task, **batch)[0] for task in model.tasks}
    plain = model.encoder(**batch).last_hidden_state  # outside a task's forward: no adapter active
    assert torch.allclose(plain, model.hidden_states("tnews", **batch)[-1])
    assert not torch.allclose(after["ocnli"], before["ocnli"])
    assert torch.allclose(after["tnews"], before["tnews"]) and torch.allclose(after["ocemotion"], before["ocemotion"])
    groups = parameter_groups(multitask_rates(model, lr=1.0, head_lr=10.0), weight_decay=0.0, layout=BY_RATE)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert {rate[id(p)] for _, p in adapters} == {10.0}  # trained from zero, as a head is


# ------------------------------------------------------------------------------------------------ training
# every method on the mix of every head type; the cut shared top with a loss-level and a gradient-level one
CASES = [(method, "mixed") for method in sorted(METHODS)] + [("equal", "all private"), ("pcgrad", "all private")]


@pytest.mark.parametrize("method, mix", CASES)
def test_every_structure_trains_with_every_method_and_resumes_exactly(tiny_config, tmp_path, monkeypatch, method, mix):
    config = tiny_config(*MIXES[mix], f"weighting.method={method}", "train.steps=3", "train.eval_every=3",
                         "train.mixed_precision=bf16", *([PARAMS[method]] if method in PARAMS else []))
    straight = Trainer(config, tmp_path / "straight", show_progress=False)
    initial = {name: tensor.clone() for name, tensor in straight.unwrapped.state_dict().items()}
    straight.train()
    Trainer(config, tmp_path / "resumed", show_progress=False).train(until_step=1)
    resumed = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False)
    resumed.train()
    final = straight.unwrapped.state_dict()
    for name, tensor in final.items():
        assert torch.equal(tensor, resumed.unwrapped.state_dict()[name]), name
    moved = {name for name, tensor in final.items() if not torch.equal(tensor, initial[name])}
    task_own = {name for name, p in straight.unwrapped.named_parameters()
                if any(p is q for q in straight.unwrapped.task_parameters())}
    assert any("lora_" in name or name.startswith("private.") for name in task_own)
    untrained = sorted(name for name in task_own - moved if "lora_A" not in name)  # A waits for B to leave 0
    assert not untrained, untrained
    logs = [RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed")]
    assert logs[0] == logs[1]

    # the structure comes from best/model.json; float32 weights, to compare them exactly
    loaded = LoadedRun(tmp_path / "straight", show_progress=False, float32_weights=True)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, final[name]), name

    # every head predicts with the weights cast to bf16, but those that run with autocast off
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    cast = LoadedRun(tmp_path / "straight", device="cpu", show_progress=False)
    float32 = set(float32_modules(cast.model))
    assert cast.bf16 and {p.dtype for p in cast.model.encoder.parameters()} == {torch.bfloat16}
    assert bool(float32) is (mix == "mixed")   # its SAN and BiLSTM heads
    for name, parameter in cast.model.named_parameters():
        if any(name.startswith(f"{module}.") for module in float32):   # untouched, not rounded to bf16 and back
            assert torch.equal(parameter, final[name]), name
        else:
            assert parameter.dtype == torch.bfloat16, name
    for task in cast.tasks:
        probabilities = cast.probabilities(task, load_split(config.data.data_dir, task, "a").head(6))
        assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_loading_a_model_skips_the_random_draw_of_the_weights_it_reads(tiny_bert, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    model = tiny_model(tiny_bert, *MIXES["mixed"])   # private layers and adapters too
    model.save(tmp_path / "m")

    def drawn(self):
        raise AssertionError("the encoder's weights were drawn at random, then overwritten by the load")

    monkeypatch.setattr(PreTrainedModel, "initialize_weights", drawn)
    loaded = MultiTaskModel.load(tmp_path / "m")
    saved = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_models_saved_before_per_task_structures_still_load(tiny_bert, tmp_path):
    model = tiny_model(tiny_bert, "model.head_hidden=8", "model.task_pooling={tnews: first}", tasks=["ocnli", "tnews"])
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    old = {"task_labels": meta["task_labels"], "pooling": {"ocnli": "mean", "tnews": "first"}, "dropout": 0.0,
           "head_hidden": 8, "encoder_config": meta["encoder_config"]}
    (tmp_path / "m" / "model.json").write_text(json.dumps(old))
    loaded = MultiTaskModel.load(tmp_path / "m").eval()
    batch = pair_batch(tiny_bert)
    assert torch.equal(loaded("tnews", **batch)[0], model("tnews", **batch)[0])
    assert loaded.meta["heads"]["tnews"]["pooling"] == "first" and loaded.meta["heads"]["ocnli"]["type"] == "mlp"


def test_average_weights_refuses_runs_of_different_structures_and_adapters(tiny_config, tmp_path):
    runs = {"a": [], "b": ["model.heads={ocnli: {type: linear, samples: 2}}"],
            "lora": ["model.private={tnews: {type: lora, rank: 2}}"]}
    for name, extra in runs.items():
        Trainer(tiny_config("train.steps=1", "train.eval_every=1", *extra), tmp_path / name, show_progress=False).train()
    with pytest.raises(AveragingError, match="differ in architecture: model.heads.ocnli.samples"):
        average_weights([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")
    with pytest.raises(AveragingError, match="tnews use LoRA adapters"):
        average_weights([tmp_path / "lora", tmp_path / "lora"], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
