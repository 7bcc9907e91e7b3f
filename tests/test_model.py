import pytest
import torch

from clue_mtl.encoders import load_encoder
from clue_mtl.model import POOLINGS, MultiTaskModel, build_model, pool_mean


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
    assert loaded.heads["tnews"].pooling == "first"
    for task in ("ocnli", "tnews"):
        expected, _ = model(task, batch["input_ids"], batch["attention_mask"])
        got, _ = loaded(task, batch["input_ids"], batch["attention_mask"])
        assert torch.equal(expected, got)
    assert not hasattr(loaded.encoder, "pooler") or loaded.encoder.pooler is None
