"""Encoders: tiny builders, loading, layer lists, building a missing offline encoder.
(The offline encoders' conversions are tested in test_offline_encoders.py.)"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from clue_mtl.model import encoders

from clue_mtl.model import offline_encoders

from clue_mtl import testing
from clue_mtl.errors import EncoderError
from clue_mtl.model.encoders import encoder_layers, ensure_encoder, load_encoder
from clue_mtl.testing import build_tiny_encoder

ZH = ["今天天气很好，我们去公园散步吧。", "这家餐厅的菜太难吃了，服务也很差！",
      "北京大学成立于1898年，是中国最早的国立综合性大学。", "股市今日大涨，沪指收复3000点。",
      "我真的好开心啊哈哈哈", "他说他明天不来了。", "Apple 发布了新款 iPhone 15 Pro。"]
# tokenizer("今天天气很好", "我喜欢吃苹果") with the e5 tokenizer: <s> A </s></s> B </s>
PAIR_TOKENS = ["<s>", "▁今天", "天气", "很好", "</s>", "</s>", "▁我", "喜欢", "吃", "苹果", "</s>"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny") / "bert", kind="bert", texts=ZH)


@pytest.fixture(scope="module")
def tiny_xlmr(tmp_path_factory):
    pytest.importorskip("semantra_multilingual")
    path = build_tiny_encoder(tmp_path_factory.mktemp("tiny") / "xlmr", kind="xlmr")
    return path, load_encoder(path)   # the 17 MB tokenizer takes seconds to load: load once


def tensors(path):
    return load_file(str(Path(path) / "model.safetensors"))


# ------------------------------------------------------------------ tiny BERT
def test_tiny_bert_loads_and_encodes_pairs(tiny_bert):
    model, tok = load_encoder(tiny_bert)
    assert type(model).__name__ == "BertModel" and type(tok).__name__ == "BertTokenizer"
    assert model.pooler is None                      # dropped by default
    enc = tok("天气很好", "hello 15")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == [
        "[CLS]", "天", "气", "很", "好", "[SEP]", "h", "##e", "##l", "##l", "##o", "1", "##5", "[SEP]"]
    assert enc["token_type_ids"] == [0] * 6 + [1] * 8
    assert tok("鑫")["input_ids"][1] == tok.unk_token_id
    batch = tok(ZH[:3], padding=True, return_tensors="pt")
    out = model(**batch).last_hidden_state
    assert out.shape == (3, batch["input_ids"].shape[1], 32)


def test_tiny_bert_is_deterministic(tmp_path):
    a = build_tiny_encoder(tmp_path / "a", texts=ZH, seed=3)
    b = build_tiny_encoder(tmp_path / "b", texts=ZH, seed=3)
    c = build_tiny_encoder(tmp_path / "c", texts=ZH, seed=4)
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    assert ta.keys() == tb.keys()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert not np.array_equal(ta["embeddings.word_embeddings.weight"],
                              tc["embeddings.word_embeddings.weight"])
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_builtin_vocab_covers_common_text():
    vocab = testing.char_vocab()
    assert vocab[:5] == testing.BERT_SPECIALS and len(vocab) == len(set(vocab))
    assert {"的", "是", "，", "a", "##a", "7", "##7"} <= set(vocab)


# ------------------------------------------------------------------ tiny XLM-R
def test_tiny_xlmr_uses_the_real_tokenizer(tiny_xlmr):
    path, (model, tok) = tiny_xlmr
    assert type(model).__name__ == "XLMRobertaModel" and type(tok).__name__ == "XLMRobertaTokenizer"
    assert len(tok) == offline_encoders.E5_TOKENIZER_PIECES == model.config.vocab_size
    enc = tok("今天天气很好", "我喜欢吃苹果")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == PAIR_TOKENS
    assert "token_type_ids" not in enc
    batch = tok(ZH[:2], ZH[2:4], padding=True, return_tensors="pt")
    assert model(**batch).last_hidden_state.shape[-1] == 16


def test_tiny_xlmr_is_deterministic(tmp_path, tiny_xlmr):
    path, _ = tiny_xlmr
    again = build_tiny_encoder(tmp_path / "x", kind="xlmr")
    a, b = tensors(path), tensors(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ layers
def test_encoder_layers_bottom_to_top(tiny_bert):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model, _ = load_encoder(tiny_bert)
    layers = encoder_layers(model)
    assert len(layers) == 1 + model.config.num_hidden_layers == 3
    assert layers[0] is model.embeddings
    assert all(a is b for a, b in zip(layers[1:], model.encoder.layer))
    wrapped = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_bert))
    assert [type(m).__name__ for m in encoder_layers(wrapped)] == [
        "BertEmbeddings", "BertLayer", "BertLayer"]


def test_encoder_layers_best_effort_on_other_models():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Linear(4, 4)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = nn.Embedding(10, 4)
            self.stack = nn.Module()
            self.stack.blocks = nn.ModuleList(Block() for _ in range(5))
            self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])

        def get_input_embeddings(self):
            return self.tok_emb

    model = Other()
    layers = encoder_layers(model)
    assert layers[0] is model.tok_emb and list(layers[1:]) == list(model.stack.blocks)


# ------------------------------------------------------------------ loading errors
def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    with pytest.raises(EncoderError, match="build-encoder NAME.*e5-small, m3e-small"):
        load_encoder("artifacts-that-do-not-exist/e5-small")
    with pytest.raises(EncoderError, match="build-encoder NAME"):
        load_encoder("artifacts-that-do-not-exist/m3e-small")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder(tmp_path / "empty")


def test_a_file_or_a_folder_without_weights_is_a_clear_error(tiny_bert, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(EncoderError, match="is a file"):
        load_encoder(tmp_path / "model.bin")
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_bert, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(EncoderError, match="cannot be loaded"):
        load_encoder(weightless)


def test_an_unknown_hub_id_offline_fails_at_once(monkeypatch):
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    started = time.perf_counter()
    with pytest.raises(EncoderError, match="Hugging Face hub"):
        load_encoder("someone-unknown/no-such-model")
    assert time.perf_counter() - started < 10  # huggingface_hub's retries took 51 s


def test_unreachable_hub_says_to_pass_a_folder(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(encoders, "_hub_reachable", lambda: True)
    with pytest.raises(EncoderError, match="local model folder.*build-encoder NAME --out DIR"):
        load_encoder("hfl/chinese-roberta-wwm-ext")


@pytest.mark.parametrize("name", ["e5-small", "m3e-small"])
def test_ensure_encoder_builds_only_a_missing_offline_encoder(tmp_path, monkeypatch, name):
    built = []
    entry = offline_encoders.OFFLINE_ENCODERS[name]
    fake = offline_encoders.OfflineEncoder(lambda p, **kw: built.append(Path(p)), entry.source, entry.licence)
    monkeypatch.setitem(offline_encoders.OFFLINE_ENCODERS, name, fake)
    assert ensure_encoder("hfl/chinese-roberta-wwm-ext") == "hfl/chinese-roberta-wwm-ext"
    assert ensure_encoder(tmp_path / "artifacts" / name) == str(tmp_path / "artifacts" / name)
    assert built == [tmp_path / "artifacts" / name]
    ready = tmp_path / "ready" / name
    ready.mkdir(parents=True)
    (ready / "config.json").write_text("{}")
    ensure_encoder(ready)
    assert ensure_encoder(tmp_path / "artifacts" / "other-encoder") == str(tmp_path / "artifacts" / "other-encoder")
    assert len(built) == 1


def test_an_encoder_saved_in_bf16_trains_float32_weights(tiny_bert, tmp_path):
    """transformers 5 loads a checkpoint in its own dtype: an encoder carried in bf16 (as to a GPU)
    must still give float32 master weights, holding the bf16 values exactly."""
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(tiny_bert).to(torch.bfloat16)
    saved.save_pretrained(tmp_path / "bf16")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, tmp_path / "bf16" / name)
    model, _ = load_encoder(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weight = model.embeddings.word_embeddings.weight
    assert torch.equal(weight, saved.embeddings.word_embeddings.weight.float())
