"""AdamW's parameter groups have one home (`training.optim.parameter_groups`): each recipe's groups
are those it built before it called there, the same parameters in the same groups at the same rate
and weight decay, in the same order, so the optimiser state of a saved checkpoint still loads and
resumes exactly. The `legacy_*` functions are the recipes' own code as it was, kept as the pin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from clue_mtl.config import load_config
from clue_mtl.mlm.objective import load_masked_lm
from clue_mtl.model.encoders import encoder_layers, load_encoder
from clue_mtl.model.multitask import build_model
from clue_mtl.model.private import is_adapter
from clue_mtl.recipes.pretrain import Pretrainer
from clue_mtl.training.optim import BY_RATE, PAIRS, layer_rate_scales, multitask_rates, parameter_groups

MIXES = [
    [],
    ["model.heads={ocnli: {type: san, steps: 3, features: scalar_mix}, ocemotion: {type: bilstm, hidden: 8}}",
     "model.private={ocnli: {type: lora, rank: 4}, ocemotion: {type: layers, layers: 1}}"],
    ["model.private={ocnli: {type: layers, layers: 1}, ocemotion: {type: layers, layers: 1}, "
     "tnews: {type: layers, layers: 1}}"],
]


# ----------------------------------------------------------------------------- the code as it was
def legacy_multitask_groups(model, *, lr, head_lr, weight_decay, layer_lr_decay=1.0):
    """`optim.parameter_groups(model, ...)` before the one home."""
    scale_of = {}
    for layers in model.encoder_stacks():
        scale_of |= layer_rate_scales(layers, layer_lr_decay)
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        from_scratch = name.startswith("heads.") or is_adapter(name)
        rate = head_lr if from_scratch else lr * scale_of.get(id(parameter), 1.0)
        groups.setdefault((rate, parameter.ndim >= 2), []).append(parameter)
    return [
        {"params": params, "lr": rate, "weight_decay": weight_decay if decays else 0.0}
        for (rate, decays), params in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1]))
    ]


def legacy_mlm_head_groups(parameters, *, head_lr, weight_decay):
    """What the multi-task recipe appended for the auxiliary masked-LM head."""
    return [{"params": [p for p in parameters if p.ndim >= 2], "lr": head_lr, "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "lr": head_lr, "weight_decay": 0.0}]


def legacy_pretrain_groups(model, head_parameters, train):
    """`Pretrainer._parameter_groups` before the one home."""
    scale_of = layer_rate_scales(encoder_layers(model), train.layer_lr_decay) if train.layer_lr_decay < 1 else {}
    groups, parts = [], []
    for part, parameters in (("encoder", list(model.base_model.parameters())), ("head", head_parameters)):
        trainable = [p for p in parameters if p.requires_grad]
        for rate in sorted({scale_of.get(id(p), 1.0) for p in trainable} or {1.0}, reverse=True):
            at_rate = [p for p in trainable if scale_of.get(id(p), 1.0) == rate]
            groups += [{"params": [p for p in at_rate if p.ndim >= 2], "lr": train.lr * rate,
                        "weight_decay": train.weight_decay},
                       {"params": [p for p in at_rate if p.ndim < 2], "lr": train.lr * rate, "weight_decay": 0.0}]
            parts += [part, part]
    return groups, parts


# ----------------------------------------------------------------------------- comparing
def layout(groups: list[dict]) -> list[tuple[list[int], float, float]]:
    """Each group as (its parameters by identity, in order; lr; weight decay), exactly."""
    return [([id(p) for p in group["params"]], group["lr"], group["weight_decay"]) for group in groups]


def assert_same_optimiser_state(old: list[dict], new: list[dict]) -> None:
    """A state dict of an AdamW over the old groups, after a step, loads into one over the new."""
    before, after = torch.optim.AdamW(old), torch.optim.AdamW(new)
    for group in old:
        for parameter in group["params"]:
            parameter.grad = torch.ones_like(parameter)
    before.step()
    after.load_state_dict(before.state_dict())
    assert after.state_dict()["param_groups"] == before.state_dict()["param_groups"]
    for group in old:
        for parameter in group["params"]:
            parameter.grad = None


def tiny_multitask_model(tiny_bert, overrides):
    config = load_config(overrides=[f"model.encoder={tiny_bert}", *overrides])
    encoder, tokenizer = load_encoder(config.model.encoder)
    torch.manual_seed(0)
    return build_model(encoder, ["ocnli", "ocemotion", "tnews"], config.model, sep_token_id=tokenizer.sep_token_id)


@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("layer_lr_decay, head_lr", [(1.0, 1e-3), (0.8, 1e-3), (0.5, 2e-5), (1.0, 2e-5)])
def test_the_multitask_groups_are_those_the_recipe_built_before(tiny_bert, mix, layer_lr_decay, head_lr):
    model = tiny_multitask_model(tiny_bert, MIXES[mix])
    model.encoder.get_input_embeddings().weight.requires_grad_(False)  # `model.freeze_word_embeddings`
    settings = {"lr": 2e-5, "head_lr": head_lr, "layer_lr_decay": layer_lr_decay}
    old = legacy_multitask_groups(model, weight_decay=0.01, **settings)
    new = parameter_groups(multitask_rates(model, **settings), weight_decay=0.01, layout=BY_RATE)
    assert layout(new) == layout(old)
    assert len(old) >= (4 if layer_lr_decay < 1 else 2)
    assert_same_optimiser_state(old, new)


def test_the_auxiliary_heads_groups_are_those_the_recipe_built_before(tiny_bert):
    masked_lm, _, _ = load_masked_lm(str(tiny_bert))
    parameters = [p for p in masked_lm.cls.parameters() if p is not masked_lm.get_input_embeddings().weight]
    for head in (parameters, []):
        old = legacy_mlm_head_groups(head, head_lr=1e-3, weight_decay=0.01)
        new = parameter_groups([(p, 1.0) for p in head], lr=1e-3, weight_decay=0.01, layout=PAIRS)
        assert layout(new) == layout(old)


@pytest.mark.parametrize("layer_lr_decay", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("frozen", [None, "encoder", "head"])
def test_the_pretraining_groups_are_those_the_recipe_built_before(tiny_bert, layer_lr_decay, frozen):
    model, _, _ = load_masked_lm(str(tiny_bert))
    encoder_ids = {id(p) for p in model.base_model.parameters()}
    head_parameters = [p for p in model.parameters() if id(p) not in encoder_ids]
    if frozen:  # a part with nothing to train still has its pair of groups
        for parameter in (model.base_model.parameters() if frozen == "encoder" else head_parameters):
            parameter.requires_grad_(False)
    train = SimpleNamespace(lr=3e-3, weight_decay=0.01, layer_lr_decay=layer_lr_decay)
    recipe = SimpleNamespace(config=SimpleNamespace(train=train), head_parameters=head_parameters)
    old, old_parts = legacy_pretrain_groups(model, head_parameters, train)
    new, new_parts = Pretrainer._parameter_groups(recipe, model)
    assert layout(new) == layout(old) and new_parts == old_parts
    if not frozen:
        assert_same_optimiser_state(old, new)


def test_the_layouts_pinned():
    """Vectors take no weight decay; BY_RATE: lowest rate first, vectors first, no empty group;
    PAIRS: highest first, matrices first, both groups always."""
    matrix, vector, slow_matrix, frozen = (nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2)),
                                           nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2, 2)))
    frozen.requires_grad_(False)
    rated = [(matrix, 1.0), (vector, 1.0), (slow_matrix, 0.5), (frozen, 1.0)]
    assert layout(parameter_groups(rated, weight_decay=0.1, layout=BY_RATE)) == [
        ([id(slow_matrix)], 0.5, 0.1), ([id(vector)], 1.0, 0.0), ([id(matrix)], 1.0, 0.1)]
    assert layout(parameter_groups(rated, lr=2.0, weight_decay=0.1, layout=PAIRS)) == [
        ([id(matrix)], 2.0, 0.1), ([id(vector)], 2.0, 0.0), ([id(slow_matrix)], 1.0, 0.1), ([], 1.0, 0.0)]
    assert layout(parameter_groups([], lr=2.0, weight_decay=0.1, layout=PAIRS)) == [([], 2.0, 0.1), ([], 2.0, 0.0)]
    with pytest.raises(ValueError, match="layout"):
        parameter_groups(rated, weight_decay=0.1, layout="sorted")
