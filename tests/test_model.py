import dataclasses
import functools

import numpy as np
import pytest
import torch

from clue_mtl.data.batching import joint_batch
from clue_mtl.config import load_config
from clue_mtl.model.encoders import load_encoder
from clue_mtl.model.multitask import MultiTaskModel, build_model
from clue_mtl.model.pooling import POOLINGS, pool_mean
from clue_mtl.testing import build_tiny_encoder


def test_poolings_respect_the_mask():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert POOLINGS["first"](hidden, mask).tolist() == [[1.0, 2.0]]
    assert pool_mean(hidden, mask).tolist() == [[2.0, 3.0]]
    assert POOLINGS["max"](hidden, mask).tolist() == [[3.0, 4.0]]
    assert POOLINGS["mean_max"](hidden, mask).tolist() == [[2.0, 3.0, 3.0, 4.0]]


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_heads_give_one_logit_per_label(tiny_bert, pooling):
    encoder, tokenizer = load_encoder(tiny_bert)
    model = build_model(encoder, ["ocnli", "ocemotion", "tnews"], pooling=pooling, head_hidden=8)
    batch = tokenizer(["今天天气很好", "我"], ["是的", "不"], padding=True, return_tensors="pt")
    for task, labels in (("ocnli", 3), ("ocemotion", 7), ("tnews", 15)):
        logits, pooled = model(task, batch["input_ids"], batch["attention_mask"])
        assert logits.shape == (2, labels)
        assert pooled.shape[0] == 2


def test_save_load_round_trip(tiny_bert, tmp_path):
    encoder, tokenizer = load_encoder(tiny_bert)
    model = build_model(encoder, ["ocnli", "tnews"], pooling="mean", task_pooling={"tnews": "first"}).eval()
    batch = tokenizer(["新闻标题", "一个更长一点的新闻标题"], padding=True, return_tensors="pt")
    model.save(tmp_path / "m")
    loaded = MultiTaskModel.load(tmp_path / "m").eval()
    assert loaded.tasks == ["ocnli", "tnews"]
    assert loaded.heads["tnews"].pooling.name == "first"
    for task in ("ocnli", "tnews"):
        expected, _ = model(task, batch["input_ids"], batch["attention_mask"])
        got, _ = loaded(task, batch["input_ids"], batch["attention_mask"])
        assert torch.equal(expected, got)
    assert not hasattr(loaded.encoder, "pooler") or loaded.encoder.pooler is None


def test_segment_embedding_changes_pair_logits_only(tiny_bert):
    """OCNLI pairs reach a BERT encoder with segment B as 1s: the logits depend on the second
    segment embedding, which single-text tasks never use."""
    import pandas as pd

    from clue_mtl.data.batching import encode_frame
    from clue_mtl.predict.inference import predict_logits

    encoder, tokenizer = load_encoder(tiny_bert)
    model = build_model(encoder, ["ocnli", "tnews"], pooling="mean").eval()
    pairs = encode_frame(tokenizer, pd.DataFrame({"id": ["0", "1"], "text_a": ["今天天气很好", "他说他不来了"],
                                                  "text_b": ["我喜欢吃苹果", "股市大涨"]}), "ocnli", max_length=32)
    singles = encode_frame(tokenizer, pd.DataFrame({"id": ["0"], "text_a": ["股市今日大涨"]}), "tnews", max_length=32)
    assert all(row.tolist().count(1) == len(b) + 1 for row, b in zip(pairs.token_type_ids, ["我喜欢吃苹果", "股市大涨"]))
    predict = lambda task, data: predict_logits(model, task, data, pad_id=tokenizer.pad_token_id)
    before_pairs, before_singles = predict("ocnli", pairs), predict("tnews", singles)
    without_segments = predict("ocnli", dataclasses.replace(pairs, token_type_ids=None))
    assert not np.allclose(before_pairs, without_segments)   # all-zero segments: another input
    with torch.no_grad():
        segment_b = model.encoder.embeddings.token_type_embeddings.weight[1]
        segment_b += torch.randn(segment_b.shape, generator=torch.Generator().manual_seed(0))  # a constant shift would vanish in LayerNorm
    assert not np.allclose(before_pairs, predict("ocnli", pairs))
    np.testing.assert_array_equal(before_singles, predict("tnews", singles))


# heads that read every layer, a pair's segments (SAN) and every token (BiLSTM): what a joint
# pass must hand each head exactly as the task's own pass would
JOINT_HEADS = ("model.heads={ocnli: {type: san, steps: 2, features: scalar_mix}, ocemotion: {type: bilstm, "
               "hidden: 8}, tnews: {features: concat, layers: 2, pooling: mean}}")


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_one_encoder_pass_gives_every_task_the_output_of_its_own_pass(tmp_path, kind):
    path = build_tiny_encoder(tmp_path / kind, kind=kind)
    config = load_config(overrides=[f"model.encoder={path}", "model.dropout=0.0", JOINT_HEADS])
    encoder, tokenizer = load_encoder(path)
    torch.manual_seed(0)
    model = build_model(encoder, ["ocnli", "ocemotion", "tnews"], config.model,
                        sep_token_id=tokenizer.sep_token_id).eval()
    batches = {
        "ocnli": dict(tokenizer(["今天天气很好", "他在看书"], ["天气不错啊真的", "书"], padding=True, return_tensors="pt")),
        "ocemotion": dict(tokenizer(["我今天非常非常开心，真的太好了！", "难过"], padding=True, return_tensors="pt")),
        "tnews": dict(tokenizer(["股市", "新闻标题", "体育"], padding=True, return_tensors="pt")),
    }
    batches["tnews"].pop("token_type_ids", None)  # a task without segment ids beside one with them
    parts, joint = joint_batch(batches, tokenizer.pad_token_id)
    widths = {task: batch["input_ids"].shape[1] for task, batch in batches.items()}
    assert [(part.task, part.width) for part in parts] == list(widths.items())
    assert joint["input_ids"].shape == (7, max(widths.values()))
    assert ("token_type_ids" in joint) is (kind == "bert")
    assert int(joint["input_ids"][5, widths["tnews"]:].ne(tokenizer.pad_token_id).sum()) == 0
    seen_widths = {}  # each head is handed its own width, not the widest task's (its padding cut off)

    def record_width(task: str, head, args) -> None:
        seen_widths.setdefault(task, {arg.shape[1] for arg in (*args[0], args[1])})

    for task in batches:
        model.heads[task].register_forward_pre_hook(functools.partial(record_width, task))
    with torch.no_grad():
        together = model(parts, joint["input_ids"], joint["attention_mask"], joint.get("token_type_ids"))
        assert list(together) == list(batches)
        assert seen_widths == {task: {width} for task, width in widths.items()}
        for task, batch in batches.items():
            alone = model(task, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            for got, expected in zip(together[task], alone):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_encoder_pass_is_refused_where_tasks_run_their_own_layers(tiny_bert):
    config = load_config(overrides=[f"model.encoder={tiny_bert}", "model.private={tnews: {type: layers, layers: 1}}"])
    encoder, tokenizer = load_encoder(tiny_bert)
    model = build_model(encoder, ["ocnli", "tnews"], config.model)
    batches = {task: dict(tokenizer(["股市", "新闻"], padding=True, return_tensors="pt")) for task in ("ocnli", "tnews")}
    parts, joint = joint_batch(batches, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="private layers or adapters"):
        model(parts, joint["input_ids"], joint["attention_mask"])
