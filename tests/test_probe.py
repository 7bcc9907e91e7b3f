"""Layer comparison: linear CKA's invariances, pooled layer vectors, the frozen probe."""

import numpy as np
import pytest
import torch

from clue_mtl.model.encoders import load_encoder
from clue_mtl.recipes.probe import layer_cka, layer_vectors, linear_cka, probe_scores


def test_linear_cka_is_one_under_rotation_and_scale_and_low_for_unrelated():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(200, 24))) < 0.2
    halfway = x + rng.normal(size=x.shape)
    assert 0.2 < linear_cka(x, halfway) < 0.9


def test_layer_vectors_pool_each_layer_without_padding(tiny_bert):
    encoder, tokenizer = load_encoder(str(tiny_bert))
    texts = ["今天天气很好", "我", ("他说他明天不来了", "股市今日大涨")]
    vectors = layer_vectors(encoder, tokenizer, texts, batch_size=2)
    assert vectors.shape == (encoder.config.num_hidden_layers + 1, 3, encoder.config.hidden_size)
    alone = layer_vectors(encoder, tokenizer, texts[1:2])  # no padding in a batch of one
    assert np.allclose(vectors[:, 1], alone[:, 0], atol=1e-5)
    with torch.no_grad():
        inputs = tokenizer(*texts[2], return_tensors="pt")
        top = encoder(**inputs).last_hidden_state.mean(1).double().numpy()
    assert np.allclose(vectors[-1, 2], top[0], atol=1e-5)
    assert layer_cka(vectors, vectors) == pytest.approx([1.0] * vectors.shape[0])


def test_the_probe_reads_what_a_layer_holds():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    informative = rng.normal(size=(600, 8)) + np.eye(3, 8)[labels] * 3
    noise = rng.normal(size=(600, 8))
    layers = np.stack([noise, informative])
    scores = probe_scores(layers[:, :400], labels[:400], layers[:, 400:], labels[400:])
    assert scores[0] < 0.45 < 0.9 < scores[1]


def test_compare_encoders_cli(tiny_bert, tmp_path, data_dir, capsys):
    import json

    from clue_mtl.cli import main
    from clue_mtl.testing import build_tiny_encoder

    out = tmp_path / "compare.json"
    assert main(["compare-encoders", "--before", str(tiny_bert), "--after", str(tiny_bert), "--texts", "40",
                 "--probe-rows", "60", "--data-dir", str(data_dir), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cka"] == pytest.approx([1.0] * len(result["cka"]))
    assert result["probe_before"] == result["probe_after"] and len(result["probe_after"]) == len(result["cka"])
    assert "CKA" in capsys.readouterr().out

    other = build_tiny_encoder(tmp_path / "other", seed=1)  # the same tokenizer, other weights
    assert main(["compare-encoders", "--before", str(tiny_bert), "--after", str(other), "--texts", "40",
                 "--data-dir", str(data_dir), "--json", str(out)]) == 0
    assert max(json.loads(out.read_text())["cka"][1:]) < 0.99
    assert main(["compare-encoders", "--before", str(tiny_bert), "--after", str(tmp_path / "missing"),
                 "--data-dir", str(data_dir)]) == 2
    assert main(["compare-encoders", "--before", str(tiny_bert), "--after", str(tiny_bert), "--texts", "1",
                 "--data-dir", str(data_dir)]) == 2
    assert "error:" in capsys.readouterr().err
