import numpy as np
import pytest

from clue_mtl.batching import (EncodedTask, MultiTaskBatches, epoch_batches, inference_batches, pad_batch,
                               task_batch_sizes)


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
