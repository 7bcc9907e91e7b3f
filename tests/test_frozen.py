"""Frozen lower layers and their stored output (`model.frozen_layers`, `train.cache_frozen`)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from clue_mtl.model import frozen
from clue_mtl.data.batching import joint_batch
from clue_mtl.config import load_config
from clue_mtl.model.encoders import encoder_layers, load_encoder
from clue_mtl.errors import ConfigError, RunFolderError
from clue_mtl.model.frozen import FrozenStates, StateCache, freeze_bottom, prepare_cache_folder
from clue_mtl.model.multitask import build_model
from clue_mtl.runs.folder import RunFolder
from clue_mtl.testing import build_tiny_encoder
from clue_mtl.recipes.multitask import Trainer
from clue_mtl.weighting import METHODS

CACHED = ("model.frozen_layers=1", "train.cache_frozen=true")
# heads of every kind that read layer k or above: SAN on the pairs, a BiLSTM, two top layers side by side
HEADS = ("model.heads={ocnli: {type: san, steps: 2}, ocemotion: {type: bilstm, hidden: 8}, "
         "tnews: {type: attention, heads: 2, features: concat, layers: 2}}")


def _encoder_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.encoder.state_dict().items()}


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_logits_through_the_cache_equal_those_through_the_encoder(tmp_path, kind):
    """A batch whose rows are computed through the frozen layers and stored, then the same batch
    read back from the cache: the same logits and features, bit for bit, and both those of the
    whole encoder whose layer k hands the layer above its output rounded to bf16."""
    path = build_tiny_encoder(tmp_path / kind, kind=kind, layers=3)
    config = load_config(overrides=[f"model.encoder={path}", HEADS])
    encoder, tokenizer = load_encoder(path)
    torch.manual_seed(0)
    model = build_model(encoder, ["ocnli", "ocemotion", "tnews"], config.model,
                        sep_token_id=tokenizer.sep_token_id).eval()
    freeze_bottom(model.encoder, 1)
    frozen.check_frozen(model, 1, cached=True)
    batches = {
        "ocnli": dict(tokenizer(["今天天气很好", "他在看书"], ["天气不错啊真的", "书"], padding=True, return_tensors="pt")),
        "ocemotion": dict(tokenizer(["我今天非常非常开心，真的太好了！", "难过"], padding=True, return_tensors="pt")),
        "tnews": dict(tokenizer(["股市", "新闻标题", "体育"], padding=True, return_tensors="pt")),
    }
    batches["tnews"].pop("token_type_ids", None)
    for task, batch in batches.items():
        batch["rows"] = torch.arange(len(batch["input_ids"])) + 1  # rows 1.. of each task's data
    lengths = {task: torch.tensor([0] + batch["attention_mask"].sum(1).tolist()).numpy()
               for task, batch in batches.items()}
    cache = StateCache(tmp_path / "cache", lengths=lengths, hidden=encoder.config.hidden_size, max_bytes=1 << 30).open(None)
    states = FrozenStates(model.encoder, 1, cache, pad_id=tokenizer.pad_token_id)
    parts, joint = joint_batch(batches, tokenizer.pad_token_id)

    def through_the_cache():
        stored = states.for_batches(batches)
        start = (1, states.padded([row for task in batches for row in stored[task]], joint["input_ids"].shape[1],
                                  joint["input_ids"].device))
        with torch.no_grad():
            return model(parts, joint["input_ids"], joint["attention_mask"], joint.get("token_type_ids"), start=start)

    computed = through_the_cache()
    assert states.computed == 7 and len(cache) == 7
    read_back = through_the_cache()
    assert states.computed == 7  # every row read back, none computed again

    layer = encoder_layers(model.encoder)[1]
    rounded = layer.register_forward_hook(lambda _module, _inputs, out: out.to(torch.bfloat16).float()
                                          if isinstance(out, torch.Tensor) else
                                          (out[0].to(torch.bfloat16).float(), *out[1:]))
    with torch.no_grad():
        encoder_rounded = model(parts, joint["input_ids"], joint["attention_mask"], joint.get("token_type_ids"))
    rounded.remove()
    with torch.no_grad():
        whole = model(parts, joint["input_ids"], joint["attention_mask"], joint.get("token_type_ids"))
    for task in batches:
        for got, again, expected, unrounded in zip(computed[task], read_back[task], encoder_rounded[task], whole[task]):
            assert torch.equal(got, again)
            assert torch.equal(got, expected)
            torch.testing.assert_close(got, unrounded, rtol=0.05, atol=0.05)  # the bf16 rounding of layer k


def test_the_store_reads_back_what_it_was_given_and_resumes_from_its_commits(tmp_path):
    lengths = {"ocnli": torch.tensor([3, 2, 4]).numpy(), "tnews": torch.tensor([1, 5]).numpy()}
    rows = {(task, row): torch.randn(int(n), 8).to(torch.bfloat16) for task, counts in lengths.items()
            for row, n in enumerate(counts)}

    def store(step=None, max_bytes=1 << 20):
        return StateCache(tmp_path, lengths=lengths, hidden=8, max_bytes=max_bytes).open(step)

    cache = store()
    assert cache.put("ocnli", 2, rows["ocnli", 2]) and cache.put("tnews", 1, rows["tnews", 1])
    assert not cache.put("ocnli", 2, rows["ocnli", 2])  # stored already
    cache.commit(4)
    assert cache.put("ocnli", 0, rows["ocnli", 0])  # after the commit: a kill would lose it
    with open(cache.index_file, "ab") as index:
        index.write(b"\x07" * 13)  # and a record cut short by the kill
    for step in (4, 9):
        resumed = store(step)
        assert len(resumed) == 2
        assert torch.equal(resumed.get("ocnli", 2), rows["ocnli", 2]) and torch.equal(resumed.get("tnews", 1), rows["tnews", 1])
        assert resumed.get("ocnli", 0) is None and resumed.get("tnews", 0) is None
        assert os.path.getsize(resumed.index_file) == 2 * frozen.RECORD_BYTES
    assert len(store(3)) == 0  # no commit at or before step 3: an empty cache
    assert len(store(4)) == 0  # step 3's resume forgot the commit of step 4
    bounded = store(max_bytes=10 * 8 * 2)  # room for 10 tokens of 8 bf16 values
    assert bounded.put("tnews", 1, rows["tnews", 1]) and bounded.put("ocnli", 2, rows["ocnli", 2])
    assert not bounded.put("ocnli", 0, rows["ocnli", 0]) and len(bounded) == 2


def test_a_damaged_or_hostile_store_is_one_line(tmp_path):
    lengths = {"tnews": torch.tensor([2, 2]).numpy()}
    cache = StateCache(tmp_path / "a", lengths=lengths, hidden=4, max_bytes=1 << 20).open(None)
    cache.put("tnews", 0, torch.zeros(2, 4, dtype=torch.bfloat16))
    cache.commit(1)
    with open(cache.index_file, "r+b") as index:  # the record now claims 3 tokens
        index.seek(24)
        index.write((3).to_bytes(8, "little"))
    with pytest.raises(RunFolderError, match="index-0.bin: a record does not fit tnews row 0"):
        StateCache(tmp_path / "a", lengths=lengths, hidden=4, max_bytes=1 << 20).open(1)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "states-0.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(RunFolderError, match="states-0.bin: cannot be opened as a cache file"):
        StateCache(tmp_path / "b", lengths=lengths, hidden=4, max_bytes=1 << 20).open(None)
    assert not (tmp_path / "elsewhere.bin").exists()

    (tmp_path / "c").mkdir()
    (tmp_path / "elsewhere.bin").write_bytes(b"keep")
    os.link(tmp_path / "elsewhere.bin", tmp_path / "c" / "states-0.bin")  # a write there would land here too
    with pytest.raises(RunFolderError, match="states-0.bin: a file with other links"):
        StateCache(tmp_path / "c", lengths=lengths, hidden=4, max_bytes=1 << 20).open(None)
    assert (tmp_path / "elsewhere.bin").read_bytes() == b"keep"


def test_a_changed_key_rebuilds_the_cache(tmp_path):
    lengths = {"tnews": torch.tensor([2]).numpy()}
    key_a, key_b = {"rows": "a", "digest": "a" * 64}, {"rows": "b", "digest": "b" * 64}
    folder_a = prepare_cache_folder(tmp_path, key_a, fresh=True)
    cache = StateCache(folder_a, lengths=lengths, hidden=4, max_bytes=1 << 20).open(None)
    cache.put("tnews", 0, torch.ones(2, 4, dtype=torch.bfloat16))
    cache.commit(3)
    assert prepare_cache_folder(tmp_path, key_a, fresh=False) == folder_a  # the same key: kept
    assert len(StateCache(folder_a, lengths=lengths, hidden=4, max_bytes=1 << 20).open(3)) == 1

    folder_b = prepare_cache_folder(tmp_path, key_b, fresh=False)
    assert [path.name for path in tmp_path.iterdir()] == [folder_b.name]  # key a's folder is gone
    assert json.loads((folder_b / "key.json").read_text()) == key_b
    assert len(StateCache(folder_b, lengths=lengths, hidden=4, max_bytes=1 << 20).open(3)) == 0


def _tiny_run(tiny_config, small_data_dir, *overrides):
    """Nine training rows a task, three a step: steps 4-6 are a second epoch, read from the cache."""
    return tiny_config(f"data.data_dir={small_data_dir}", "data.max_train_rows=9", "data.max_dev_rows=12",
                       *overrides)


def test_resume_is_exact_with_the_cache_half_built(tiny_config, small_data_dir, tmp_path, killed_at):
    config = _tiny_run(tiny_config, small_data_dir, *CACHED, "train.eval_every=2", "model.dropout=0.1")
    straight = Trainer(config, tmp_path / "straight", show_progress=False)
    straight.train()
    assert straight.frozen_states.computed == 27  # each row once: 9 a task

    first = Trainer(config, tmp_path / "resumed", show_progress=False)
    with killed_at(Trainer, "_apply_gradients", 3):  # killed in step 3, after it stored its rows
        first.train()
    cache = first.frozen_states.cache
    assert len(cache) == 27 and cache.commits == [[2, 18, cache.commits[0][2]]]  # 9 rows past the last commit
    second = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False)
    second.train()
    assert second.state.step == 6 and second.frozen_states.computed == 9  # step 3's rows, once more

    expected = load_file(tmp_path / "straight/checkpoint-6/model.safetensors")
    got = load_file(tmp_path / "resumed/checkpoint-6/model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    straight_log, resumed_log = (RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed"))
    assert straight_log == resumed_log


def test_a_resume_under_a_changed_key_rebuilds_the_cache(tiny_config, small_data_dir, tmp_path, monkeypatch):
    config = _tiny_run(tiny_config, small_data_dir, *CACHED)
    first = Trainer(config, tmp_path / "run", show_progress=False)
    first.train(until_step=3)
    old = first.frozen_states.cache.folder
    monkeypatch.setattr(frozen, "FORMAT", frozen.FORMAT + 1)  # e.g. a kit that stores states otherwise
    second = Trainer(config, tmp_path / "run", resume=True, show_progress=False)
    second.train()
    assert not old.exists() and second.frozen_states.cache.folder.exists()
    assert second.frozen_states.computed == 27  # every row computed again, none read from the old key's files
    assert [path.name for path in (tmp_path / "run" / "cache").iterdir()] == [second.frozen_states.cache.folder.name]


@pytest.mark.parametrize("cached", [False, True], ids=["frozen", "cached"])
def test_frozen_parameters_do_not_move_and_run_without_dropout(tiny_config, small_data_dir, cached):
    config = _tiny_run(tiny_config, small_data_dir, "model.frozen_layers=1", f"train.cache_frozen={cached}",
                       "model.dropout=0.1", "train.eval_every=6")
    trainer = Trainer(config, show_progress=False)
    model = trainer.unwrapped
    frozen_modules = encoder_layers(model.encoder)[:2]  # the embeddings and layer 1 of 2
    frozen_names = {name for name, parameter in model.named_parameters()
                    if any(parameter is p for module in frozen_modules for p in module.parameters())}
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    modes = []
    for module in frozen_modules:
        module.register_forward_pre_hook(lambda module, _args: modes.append(module.training))
    trainer.train()
    assert modes and not any(modes)  # eval mode in every training step: no dropout
    seen = len(modes)
    trainer.evaluate()
    assert len(modes) > seen  # evaluation runs the whole encoder, cache or not
    in_optimiser = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        if name in frozen_names:
            assert torch.equal(parameter, before[name]) and parameter.grad is None and id(parameter) not in in_optimiser
        elif name.startswith("encoder."):
            assert not torch.equal(parameter, before[name]), name  # the layer above trains
    assert len(frozen_names) == len(list(frozen_modules[0].parameters())) + len(list(frozen_modules[1].parameters()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_weighting_method_and_head_trains_from_the_cache(tiny_config, small_data_dir, method):
    """Every weighting method (per-task passes for PCGrad and MGDA, the last shared layer for
    GradNorm), every kind of head that reads layer k or above, and EMA: the frozen layers stay as
    they were, each row runs through them once, the layer above trains."""
    trainer = Trainer(_tiny_run(tiny_config, small_data_dir, *CACHED, HEADS, f"weighting.method={method}",
                                "train.ema_decay=0.5", "train.eval_every=6"), show_progress=False)
    before = _encoder_state(trainer.unwrapped)
    trainer.train()
    after = trainer.unwrapped.encoder.state_dict()
    assert trainer.frozen_states.computed == 27 and trainer.ema.updates == 6
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("embeddings.", "encoder.layer.0.")))
    assert not torch.equal(before["encoder.layer.1.output.dense.weight"], after["encoder.layer.1.output.dense.weight"])


def test_a_student_of_soft_labels_trains_from_the_cache(tiny_config, small_data_dir, tmp_path):
    from clue_mtl.training.distill import write_soft_labels

    teacher = Trainer(tiny_config(f"data.data_dir={small_data_dir}", "data.max_train_rows=null", "name=teacher",
                                  "train.steps=2", "train.eval_every=2"), show_progress=False)
    teacher.train()
    soft = write_soft_labels([teacher.run_dir], tmp_path / "soft.safetensors")
    student = Trainer(_tiny_run(tiny_config, small_data_dir, *CACHED, f"distill.soft_labels={soft}", "name=student",
                                "distill.mode=annealed", "train.ema_decay=0.9"), show_progress=False)
    assert all("teacher_probs" in batch and "rows" in batch for batch in student.batches[0].values())
    student.train()
    assert student.frozen_states.computed == 27 and student.ema.updates == 6


@pytest.mark.parametrize("overrides, message", [
    (("model.frozen_layers=1", "train.fgm_epsilon=0.5"), "perturbs the word embeddings, which model.frozen_layers"),
    (("train.cache_frozen=true",), "set model.frozen_layers"),
    ((*CACHED, "auxiliary_mlm.batch_size=2"), "does not combine with the auxiliary masked LM"),
    ((*CACHED, "model.heads={tnews: {features: scalar_mix}}"), "model.heads.tnews: a scalar mix reads every layer"),
    (("model.num_layers=1", "model.frozen_layers=2"), r"model.frozen_layers \(2\) must not pass model.num_layers"),
    (("model.frozen_layers=-1",), "model.frozen_layers must lie in"),
])
def test_what_cannot_hold_is_refused_with_the_config(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


@pytest.mark.parametrize("overrides, message", [
    (("model.frozen_layers=3",), "model.frozen_layers is 3, but the encoder has 2 layers"),
    (("model.frozen_layers=2", "model.private={ocnli: {type: layers, layers: 1}}"),
     r"model.private.ocnli: copies of the top 1 layers reach below model.frozen_layers \(2\) of 2"),
    (("model.frozen_layers=1", "model.private={ocnli: {type: lora, rank: 2}}"), "LoRA adapters in layers that"),
    ((*CACHED, "model.heads={tnews: {features: concat, layers: 3}}"), "model.heads.tnews: features concat read"),
    (("model.frozen_layers=2", "weighting.method=pcgrad"), "leaves it no trainable layer"),
    (("model.frozen_layers=2", "weighting.method=gradnorm"), "leaves it no trainable layer"),
])
def test_what_cannot_hold_is_refused_with_the_encoder(tiny_config, small_data_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(_tiny_run(tiny_config, small_data_dir, *overrides), show_progress=False)


def test_a_refusal_is_one_line_and_exit_2(tiny_config, tmp_path, capsys):
    from clue_mtl.cli import main
    from clue_mtl.config import save_config

    save_config(tiny_config(), tmp_path / "tiny.yaml")
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--set", "model.frozen_layers=9"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["error: model.frozen_layers is 9, but the encoder has 2 layers"]


def test_an_encoder_not_known_to_start_from_stored_states_is_refused_with_the_cache(tiny_bert):
    """DeBERTa-v2, for one, runs a convolution inside its layer loop: a split pass would skip it."""
    config = load_config(overrides=[f"model.encoder={tiny_bert}"])
    encoder, _ = load_encoder(tiny_bert)
    model = build_model(encoder, ["tnews"], config.model)
    frozen.check_frozen(model, 1, cached=True)
    encoder.config.model_type = "deberta-v2"
    with pytest.raises(ConfigError, match=r"\(deberta-v2\) is not an encoder whose layers are known"):
        frozen.check_frozen(model, 1, cached=True)
    frozen.check_frozen(model, 1, cached=False)  # freezing alone needs no split pass
