"""Distillation, EMA, FGM and weight averaging: hand-computed values and the run-folder flows."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clue_mtl.training.adversarial import FGM
from clue_mtl.predict.averaging import AveragingError, average_weights
from clue_mtl.config import load_config
from clue_mtl.data.folder import load_split
from clue_mtl.errors import ConfigError
from clue_mtl.training.distill import (SoftLabelError, annealed_mix, annealed_target, distillation_loss, read_soft_labels,
                              write_soft_labels)
from clue_mtl.training.ema import ExponentialMovingAverage
from clue_mtl.model.encoders import load_encoder
from clue_mtl.predict.inference import LoadedRun
from clue_mtl.model.multitask import build_model
from clue_mtl.recipes.multitask import train

# ----------------------------------------------------------------------------------- losses


def test_annealed_target_moves_from_teacher_to_gold():
    gold = torch.tensor([[0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.2, 0.5, 0.3]])
    # lambda = step / total; target = lambda * gold + (1 - lambda) * teacher
    # step 0:  lambda 0   -> the teacher, [0.2, 0.5, 0.3]
    # step 5:  lambda 0.5 -> [0.5*0 + 0.5*0.2, 0.5*1 + 0.5*0.5, 0.5*0 + 0.5*0.3] = [0.1, 0.75, 0.15]
    # step 10: lambda 1   -> the gold label, [0, 1, 0]
    # step 4:  lambda 0.4 -> [0.6*0.2, 0.4 + 0.6*0.5, 0.6*0.3] = [0.12, 0.7, 0.18]
    expected = {0: [0.2, 0.5, 0.3], 5: [0.1, 0.75, 0.15], 10: [0.0, 1.0, 0.0], 4: [0.12, 0.7, 0.18]}
    for step, values in expected.items():
        assert torch.allclose(annealed_target(gold, teacher, step, 10), torch.tensor([values]), atol=1e-7)
    assert torch.allclose(annealed_target(torch.tensor([1]), teacher, 5, 10), torch.tensor([[0.1, 0.75, 0.15]]))
    assert [annealed_mix(s, 10) for s in (0, 5, 10, 12)] == [1.0, 0.5, 0.0, 0.0]
    assert annealed_mix(5, 10, start=0.8, end=0.2) == pytest.approx(0.5)


# Two rows, three classes, chosen so the softmaxes are simple:
#   row 0: logits [ln 2, 0, 0]  -> student p = [1/2, 1/4, 1/4]; teacher q = [1/4, 1/2, 1/4]; gold 0
#   row 1: logits [0, ln 3, 0]  -> student p = [1/5, 3/5, 1/5]; teacher q = [1/5, 3/5, 1/5]; gold 2
LOGITS = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, math.log(3), 0.0]])
GOLD = torch.tensor([0, 2])
TEACHER = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2]])


def test_distillation_loss_by_hand():
    # hard = mean(-ln p[gold]) = (ln 2 + ln 5) / 2 = ln 10 / 2
    hard = math.log(10) / 2
    # T = 1: KL(q || p) row 0 = 1/4 ln(1/2) + 1/2 ln 2 + 1/4 ln 1 = ln 2 / 4; row 1 = 0 -> batchmean ln 2 / 8
    kl = math.log(2) / 8
    loss = distillation_loss(LOGITS, GOLD, TEACHER, mix=0.3, temperature=1.0, kind="kl")
    assert loss.item() == pytest.approx(0.3 * kl + 0.7 * hard, rel=1e-6)

    # T = 2, row 0: teacher q^(1/2) renormalised = [b, a, b] and student softmax(logits / 2) = [a, b, b]
    # with a = sqrt2 / (sqrt2 + 2) = sqrt2 - 1, b = 1 / (sqrt2 + 2) = (2 - sqrt2) / 2, a / b = sqrt2, so
    # KL = a ln(a/b) + b ln(b/a) = (a - b) ln sqrt2 = (3 sqrt2 - 4) / 2 * ln 2 / 2. Row 1 stays 0 (q and p
    # are proportional to [1, sqrt3, 1] at T = 2). The soft term is T^2 * batchmean = 4 * KL / 2.
    kl_t2 = (3 * math.sqrt(2) - 4) / 2 * math.log(2) / 2
    loss = distillation_loss(LOGITS, GOLD, TEACHER, mix=0.3, temperature=2.0, kind="kl")
    assert loss.item() == pytest.approx(0.3 * 4 * kl_t2 / 2 + 0.7 * hard, rel=1e-6)

    # soft_ce at T = 1: row 0 -(1/4 ln 1/2 + 1/2 ln 1/4 + 1/4 ln 1/4) = 7/4 ln 2;
    # row 1 -(2/5 ln 1/5 + 3/5 ln 3/5) = 2/5 ln 5 + 3/5 ln 5/3
    soft_ce = (1.75 * math.log(2) + 0.4 * math.log(5) + 0.6 * math.log(5 / 3)) / 2
    loss = distillation_loss(LOGITS, GOLD, TEACHER, mix=0.3, temperature=1.0, kind="soft_ce")
    assert loss.item() == pytest.approx(0.3 * soft_ce + 0.7 * hard, rel=1e-6)

    # class weights weigh the hard term only: (w0 ln 2 + w2 ln 5) / (w0 + w2) with w = [2, 1, 0.5]
    weighted = (2 * math.log(2) + 0.5 * math.log(5)) / 2.5
    loss = distillation_loss(LOGITS, GOLD, TEACHER, mix=0.3, kind="kl", class_weight=torch.tensor([2.0, 1.0, 0.5]))
    assert loss.item() == pytest.approx(0.3 * kl + 0.7 * weighted, rel=1e-6)
    assert distillation_loss(LOGITS, GOLD, TEACHER, mix=0.0).item() == pytest.approx(hard, rel=1e-6)


def test_soft_cross_entropy_with_the_annealed_mix_is_bam():
    """Cross-entropy is linear in its target: mix * CE(teacher) + (1 - mix) * CE(gold) = CE(BAM target)."""
    for step in (0, 3, 7, 10):
        mix = annealed_mix(step, 10)
        target = annealed_target(F.one_hot(GOLD, 3).float(), TEACHER, step, 10)
        loss = distillation_loss(LOGITS, GOLD, TEACHER, mix=mix, kind="soft_ce")
        assert loss.item() == pytest.approx(F.cross_entropy(LOGITS, target).item(), rel=1e-6)


# ----------------------------------------------------------------------------------- runs

SOFT_ROWS = 150  # soft labels for the first rows of each training file only (of 400; the real files' 106k take a minute)


@pytest.fixture(scope="module")
def runs(data_dir, tiny_bert, tmp_path_factory):
    """Three tiny 6-step runs: two on all tasks (different seeds), one on OCNLI alone."""
    out = tmp_path_factory.mktemp("teachers")

    def run(name, *overrides):
        config = load_config(overrides=[
            f"data.data_dir={data_dir}", f"model.encoder={tiny_bert}", f"output_dir={out}", f"name={name}",
            "data.max_train_rows=48", "data.max_dev_rows=24", "data.max_length=32", "train.steps=6",
            "train.batch_size=9", "train.eval_every=3", "train.log_every=3", "train.lr=1e-3", *overrides])
        return train(config, show_progress=False).run_dir

    return {"all": run("all"), "all_seed1": run("all_seed1", "train.seed=1"),
            "ocnli": run("ocnli", "data.tasks=[ocnli]", "train.batch_size=3")}


def test_soft_labels_average_the_teachers_over_training_rows(runs, data_dir, tmp_path):
    path = write_soft_labels([runs["all"], runs["ocnli"]], tmp_path / "soft.safetensors", max_rows=SOFT_ROWS)
    soft = read_soft_labels(path)
    assert soft.tasks == ["ocnli", "ocemotion", "tnews"]
    for task, classes in (("ocnli", 3), ("ocemotion", 7), ("tnews", 15)):
        frame = load_split(data_dir, task, "train").head(SOFT_ROWS)
        assert soft.ids[task] == frame["id"].tolist()
        assert soft.probs[task].shape == (SOFT_ROWS, classes)
        assert np.allclose(soft.probs[task].sum(axis=1), 1.0, atol=1e-5)

    # OCNLI is covered by both runs, the other tasks by the multi-task run alone.
    frame = load_split(data_dir, "ocnli", "train").head(SOFT_ROWS)
    both = [LoadedRun(runs["all"]), LoadedRun(runs["ocnli"])]
    expected = (both[0].probabilities("ocnli", frame) + both[1].probabilities("ocnli", frame)) / 2
    assert np.allclose(soft.probs["ocnli"], expected, atol=1e-6)
    frame = load_split(data_dir, "tnews", "train").head(SOFT_ROWS)
    assert np.allclose(soft.probs["tnews"], both[0].probabilities("tnews", frame), atol=1e-6)

    # teachers: run folder, resolved config, best dev score
    assert [t["run_dir"] for t in soft.teachers] == [str(runs["all"].resolve()), str(runs["ocnli"].resolve())]
    assert [t["tasks"] for t in soft.teachers] == [["ocnli", "ocemotion", "tnews"], ["ocnli"]]
    assert soft.teachers[1]["config"]["data"]["tasks"] == ["ocnli"]
    evals = [json.loads(line) for line in (runs["all"] / "metrics.jsonl").read_text().splitlines()]
    best = max((e for e in evals if e["kind"] == "eval"), key=lambda e: e["mean_macro_f1"])
    assert soft.teachers[0]["best"]["mean_macro_f1"] == best["mean_macro_f1"]
    soft.check_split(0.1, 42)
    with pytest.raises(SoftLabelError, match="split_seed 42"):
        soft.check_split(0.1, 7)

    # aligning to a training frame's ids, in its order
    ids = soft.ids["tnews"][::-7]
    rows = [soft.ids["tnews"].index(i) for i in ids]
    assert np.array_equal(soft.for_ids("tnews", ids), soft.probs["tnews"][rows])
    with pytest.raises(SoftLabelError, match="no soft label for id 'nope'"):
        soft.for_ids("tnews", [ids[0], "nope"])


def test_soft_labels_from_other_rows_with_the_same_ids_are_refused(runs, data_dir, tmp_path):
    path = write_soft_labels([runs["ocnli"]], tmp_path / "soft.safetensors", max_rows=SOFT_ROWS)
    soft = read_soft_labels(path)
    frame = load_split(data_dir, "ocnli", "train").head(SOFT_ROWS)
    assert np.array_equal(soft.for_frame("ocnli", frame.iloc[::-1])[:, 0], soft.probs["ocnli"][::-1])
    other = frame.copy()
    other.loc[other.index[3], "text_b"] = other["text_b"].iloc[3] + "吗"  # another file, the same ids
    with pytest.raises(SoftLabelError, match=f"ocnli row '{frame['id'].iloc[3]}' has other text"):
        soft.for_frame("ocnli", other)


def test_several_teachers_at_temperature_2_give_the_mean_of_their_tempered_distributions(runs, data_dir, tmp_path):
    # by hand: at T = 2 a distribution is square-rooted and renormalised: teachers (0.9, 0.1) and
    # (0.5, 0.5) become (3/4, 1/4) and (1/2, 1/2), whose mean (5/8, 3/8) is the target; the mean
    # distribution tempered, (0.7, 0.3) -> (0.6044, 0.3956), would not be.
    teachers = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
    logits, gold = torch.zeros(1, 2), torch.tensor([0])
    soft = distillation_loss(logits, gold, teachers, mix=1.0, temperature=2.0)
    target = torch.tensor([[5 / 8, 3 / 8]])
    expected = 4 * F.kl_div(F.log_softmax(logits / 2, -1), target, reduction="batchmean")
    assert soft.item() == pytest.approx(expected.item(), abs=1e-6)
    # at T = 1 the ensemble target is the mean the file stores
    assert distillation_loss(logits, gold, teachers, mix=1.0).item() == pytest.approx(
        distillation_loss(logits, gold, teachers.mean(1), mix=1.0).item(), abs=1e-6)

    # the file keeps each teacher's matrix where several cover a task, and the student reads them all
    path = write_soft_labels([runs["all"], runs["all_seed1"]], tmp_path / "soft.safetensors", max_rows=SOFT_ROWS)
    labels = read_soft_labels(path)
    assert labels.per_teacher["tnews"].shape == (2, SOFT_ROWS, 15)
    assert np.allclose(labels.per_teacher["tnews"].mean(0), labels.probs["tnews"], atol=1e-6)
    frame = load_split(data_dir, "tnews", "train").head(SOFT_ROWS).iloc[::-1]
    rows = labels.for_frame("tnews", frame)
    assert rows.shape == (SOFT_ROWS, 2, 15)
    assert np.array_equal(rows[:, 1], labels.per_teacher["tnews"][1][::-1])
    single = read_soft_labels(write_soft_labels([runs["all"]], tmp_path / "one.safetensors", max_rows=SOFT_ROWS))
    assert not single.per_teacher and single.for_frame("tnews", frame).shape == (SOFT_ROWS, 1, 15)


def test_soft_cross_entropy_is_refused_with_methods_that_read_loss_sizes(tmp_path):
    soft = ["distill.soft_labels=soft.safetensors", "distill.kind=soft_ce"]
    with pytest.raises(ConfigError, match="weighting.method 'dwa' reads as signal"):
        load_config(overrides=[*soft, "weighting.method=dwa"])
    assert load_config(overrides=[*soft, "weighting.method=pcgrad"]).distill.kind == "soft_ce"
    assert load_config(overrides=["distill.soft_labels=soft.safetensors", "weighting.method=dwa"]).distill.kind == "kl"
    with pytest.raises(ConfigError, match="'dtp' reads as signal"):
        load_config(overrides=[*soft, "weighting.method=dtp", "weighting.params={kpi: likelihood}"])
    assert load_config(overrides=[*soft, "weighting.method=dtp"]).weighting.method == "dtp"


def test_soft_label_files_are_checked(tmp_path, runs):
    path = write_soft_labels([runs["ocnli"]], tmp_path / "soft.safetensors", max_rows=5)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata, probs = file.metadata(), file.get_tensor("ocnli")
    probs[2] *= 1.01
    save_file({"ocnli": probs}, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(SoftLabelError, match="ocnli: row 2 .* sums to 1.01"):
        read_soft_labels(tmp_path / "bad.safetensors")
    save_file({"ocnli": probs[:, :2].contiguous()}, str(tmp_path / "narrow.safetensors"), metadata=metadata)
    with pytest.raises(SoftLabelError, match=r"shape \(5, 3\)"):
        read_soft_labels(tmp_path / "narrow.safetensors")

    # the teachers' own matrices and the row digests are checked as strictly as the mean
    good = read_soft_labels(path).probs["ocnli"]
    meta = json.loads(metadata["clue_mtl.soft_labels"])
    nan = good.copy()
    nan[0, 0] = float("nan")
    cases = {
        "stray key": ({"ocnli": good, "ocnli/0": good, "ocnli/x": good}, {"teachers": 1}, "teachers' matrices"),
        "unknown task": ({"ocnli": good, "zzz/3": good}, {}, "belong to no task"),
        "NaN teacher": ({"ocnli": good, "ocnli/0": nan, "ocnli/1": good}, {"teachers": 2},
                        "ocnli/0: negative or non-finite"),
        "other mean": ({"ocnli": good, "ocnli/0": good, "ocnli/1": np.roll(good, 1, axis=1)}, {"teachers": 2},
                       "do not average"),
        "null digests": ({"ocnli": good}, {"digests": None}, "row digests do not match"),
        "bad count": ({"ocnli": good}, {"teachers": "two"}, "teachers must be a count"),
    }

    def saved(name, tensors, entry, drop=()):
        task = {k: v for k, v in {**meta["tasks"]["ocnli"], **entry}.items() if k not in drop}
        file = tmp_path / f"{name}.safetensors"
        save_file({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(file),
                  metadata={"clue_mtl.soft_labels": json.dumps({**meta, "tasks": {"ocnli": task}})})
        return file

    for name, (tensors, entry, message) in cases.items():
        with pytest.raises(SoftLabelError, match=message):
            read_soft_labels(saved(name, tensors, entry))
    # no count: one teacher, whose own matrix is the mean
    one = read_soft_labels(saved("no-count", {"ocnli": good, "ocnli/0": good}, {}, drop=("teachers",)))
    assert one.per_teacher["ocnli"].shape == (1, 5, 3)
    # a file of several teachers that kept only their mean cannot serve T != 1
    only_mean = tmp_path / "only-mean.safetensors"
    save_file({"ocnli": torch.from_numpy(np.array(good))}, str(only_mean),
              metadata={"clue_mtl.soft_labels": json.dumps({**meta, "tasks": {"ocnli": {**meta["tasks"]["ocnli"],
                                                                                        "teachers": 2}}})})
    labels = read_soft_labels(only_mean)
    labels.check_temperature(1.0)
    with pytest.raises(SoftLabelError, match="keep only the mean; distill.temperature 2.0"):
        labels.check_temperature(2.0)


def test_average_weights_is_the_elementwise_mean_and_loads(runs, tmp_path, data_dir):
    out = average_weights([runs["all"], runs["all_seed1"]], tmp_path / "soup")
    a = load_file(runs["all"] / "best/model.safetensors")
    b = load_file(runs["all_seed1"] / "best/model.safetensors")
    got = load_file(out / "best/model.safetensors")
    assert got.keys() == a.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for key in a:
        assert torch.equal(got[key], ((a[key].double() + b[key].double()) / 2).float()), key
    sources = json.loads((out / "averaged_from.json").read_text())
    assert sources["runs"] == [str(runs["all"].resolve()), str(runs["all_seed1"].resolve())]
    run = LoadedRun(out)
    probs = run.probabilities("ocemotion", load_split(data_dir, "ocemotion", "train").head(8))
    assert probs.shape == (8, 7)

    with pytest.raises(AveragingError, match="task_labels.ocemotion is only in one"):
        average_weights([runs["all"], runs["ocnli"]], tmp_path / "mixed")
    other_split = tmp_path / "other-split"  # a member that held out other dev rows
    shutil.copytree(runs["all_seed1"], other_split)
    split = json.loads((other_split / "split.json").read_text())
    first = next(iter(split))
    split[first] = split[first][1:]
    (other_split / "split.json").write_text(json.dumps(split))
    with pytest.raises(AveragingError, match="held out different dev rows"):
        average_weights([runs["all"], other_split], tmp_path / "split-soup")
    broken = tmp_path / "broken"
    shutil.copytree(runs["all_seed1"], broken)
    tensors = dict(b)
    tensors["heads.tnews.classifier.1.bias"] = torch.zeros(16)
    save_file(tensors, str(broken / "best/model.safetensors"))
    with pytest.raises(AveragingError, match=r"heads.tnews.classifier.1.bias: \(15,\) .* \(16,\)"):
        average_weights([runs["all"], broken], tmp_path / "broken-soup")


# ----------------------------------------------------------------------------------- EMA, FGM


def test_ema_is_the_hand_computed_average():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ExponentialMovingAverage(model, decay=0.5)

    def set_weights(value: float, batches: int):
        with torch.no_grad():
            model[0].weight.fill_(value)
            model[1].running_mean.fill_(value)
        model[1].num_batches_tracked.fill_(batches)

    # weights 1, 3, 5 after three steps; ema_1 = 1, ema_2 = 0.5*1 + 0.5*3 = 2, ema_3 = 0.5*2 + 0.5*5 = 3.5
    for value, batches in ((1.0, 1), (3.0, 2), (5.0, 3)):
        set_weights(value, batches)
        ema.update()
    averaged = ema.averaged.module
    assert torch.equal(averaged[0].weight, torch.full((2, 2), 3.5))
    assert torch.equal(averaged[1].running_mean, torch.full((2,), 3.5))   # float buffers are averaged
    assert averaged[1].num_batches_tracked.item() == 3                    # integer buffers are copied
    assert ema.updates == 3

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.apply_to(model):
        assert torch.equal(model[0].weight, torch.full((2, 2), 3.5))
        assert torch.equal(model[1].running_mean, torch.full((2,), 3.5))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(averaged[0].weight, torch.full((2, 2), 3.5))

    # exact resume: a fresh EMA loaded from the state continues identically
    resumed = ExponentialMovingAverage(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), decay=0.5)
    resumed.model = model
    resumed.load_state_dict(ema.state_dict())
    set_weights(7.0, 4)
    ema.update()
    resumed.update()   # 0.5*3.5 + 0.5*7 = 5.25
    assert torch.equal(resumed.averaged.module[0].weight, torch.full((2, 2), 5.25))
    assert all(torch.equal(x, y) for x, y in zip(ema.state_dict().values(), resumed.state_dict().values()))


def test_fgm_perturbs_along_the_gradient_and_restores_exactly(tiny_bert):
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(tiny_bert)
    model = build_model(encoder, ["ocnli"], dropout=0.0)
    batch = tokenizer(["今天天气很好", "我"], ["是的", "不"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2])

    def loss():
        logits, _ = model("ocnli", batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, labels)

    weight = model.encoder.get_input_embeddings().weight
    original = weight.detach().clone()
    loss().backward()
    clean_grad = weight.grad.clone()
    fgm = FGM(model, epsilon=0.5)
    assert fgm.attack()
    step = weight.detach() - original
    assert torch.linalg.vector_norm(step).item() == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(step, 0.5 * clean_grad / clean_grad.norm(), atol=1e-6)
    adversarial = loss()
    adversarial.backward()       # the adversarial gradients add to the clean ones
    assert not torch.equal(weight.grad, clean_grad)
    fgm.restore()
    assert torch.equal(weight.detach(), original)

    weight.grad.zero_()
    assert not fgm.attack()      # nothing to follow: no change, restore is a no-op
    fgm.restore()
    assert torch.equal(weight.detach(), original)
    weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        FGM(model)
