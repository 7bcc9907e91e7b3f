"""How far training moved an encoder, layer by layer: linear CKA against another encoder on the
same texts, and a frozen-encoder linear probe of OCNLI (`clue-mtl compare-encoders`).

- `layer_vectors`: each layer's mean-pooled token states (embeddings = layer 0) of some texts or
  `(a, b)` pairs, in float64;
- `linear_cka`: linear centred kernel alignment of two such matrices (Kornblith et al. 2019): 1
  when one is a rotation and scaling of the other, near 0 when unrelated; invariant to the width;
- `probe_scores`: macro-F1 of a logistic regression on each layer's frozen vectors, fitted on
  training rows and scored on dev rows: what a head could read from the layer without changing it.

Two encoders compare only over the same tokenizer (a pre-trained encoder and its source; the
vocabulary-trimmed e5-small and its pre-training): CKA pairs the same texts, so the tokens may
differ, but the probe and CKA figures describe the layers, not the tokenizers.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

Text = Union[str, tuple[str, str]]


@torch.no_grad()
def layer_vectors(encoder, tokenizer, texts: Sequence[Text], *, max_length: int = 128, batch_size: int = 64,
                  show_progress: bool = False) -> np.ndarray:
    """(layers + 1, texts, hidden) mean-pooled states of every layer, embeddings first."""
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) if isinstance(texts[i], str) else sum(map(len, texts[i])))
    pooled: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    for start in tqdm(range(0, len(order), batch_size), desc="encode", disable=not show_progress):
        rows = order[start:start + batch_size]
        batch = [texts[i] for i in rows]
        if isinstance(batch[0], str):
            inputs = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        else:
            inputs = tokenizer([a for a, _ in batch], [b for _, b in batch], truncation=True, max_length=max_length,
                               padding=True, return_tensors="pt")
        states = encoder(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"].unsqueeze(-1).double()
        stacked = torch.stack([(s.double() * mask).sum(1) / mask.sum(1) for s in states], 1)  # (batch, layers, hidden)
        for row, vectors in zip(rows, stacked.numpy()):
            pooled[row] = vectors
    return np.stack(pooled, 1)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (n, d1) and (n, d2) representations of the same n inputs."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def layer_cka(before: np.ndarray, after: np.ndarray) -> list[float]:
    """`linear_cka` of each layer of two `layer_vectors` results over the same texts."""
    if before.shape[:2] != after.shape[:2]:
        raise ValueError(f"layer vectors of different layers or texts: {before.shape} vs {after.shape}")
    return [linear_cka(b, a) for b, a in zip(before, after)]


def probe_scores(train_vectors: np.ndarray, train_labels: Sequence[int], dev_vectors: np.ndarray,
                 dev_labels: Sequence[int], *, seed: int = 0) -> list[float]:
    """Dev macro-F1 of a logistic regression (standardised features, balanced classes) on each
    layer's frozen vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for train_layer, dev_layer in zip(train_vectors, dev_vectors):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced",
                                                                   random_state=seed))
        probe.fit(train_layer, train_labels)
        scores.append(float(f1_score(dev_labels, probe.predict(dev_layer), average="macro")))
    return scores


def compare_encoders(before: str, after: str, data_dir: str, *, texts: int = 512, probe_rows: int = 0,
                     dev_rows: int = 2000, max_length: int = 128, show_progress: bool = True) -> dict:
    """Per-layer CKA of `after` against `before` on `texts` competition texts (evenly spaced over
    the corpus); with `probe_rows`, each layer's OCNLI probe (that many training rows, `dev_rows`
    of the kit's dev split) for both encoders."""
    from clue_mtl.config import DataConfig
    from clue_mtl.data.folder import task_frames
    from clue_mtl.errors import ConfigError
    from clue_mtl.mlm.objective import sample_texts
    from clue_mtl.model.encoders import load_encoder
    from clue_mtl.model.vocab import corpus_texts
    from clue_mtl.tasks import get_task

    if texts < 3 or probe_rows < 0 or (probe_rows and probe_rows < 30):
        raise ConfigError("compare-encoders: --texts must be at least 3 and --probe-rows 0 or at least 30")
    sample = sample_texts(corpus_texts(data_dir), texts)
    encoders = {name: load_encoder(path) for name, path in (("before", before), ("after", after))}
    vectors = {name: layer_vectors(e, t, sample, max_length=max_length, show_progress=show_progress)
               for name, (e, t) in encoders.items()}
    result = {"texts": len(sample), "cka": layer_cka(vectors["before"], vectors["after"])}
    if probe_rows:
        frames = task_frames(DataConfig(data_dir=data_dir, max_train_rows=probe_rows, max_dev_rows=dev_rows), "ocnli")
        index = {label: i for i, label in enumerate(get_task("ocnli").labels)}
        labels = [frame["label"].map(index).tolist() for frame in (frames.train, frames.dev)]
        for name, (encoder, tokenizer) in encoders.items():
            train, dev = (layer_vectors(encoder, tokenizer, list(zip(f["text_a"], f["text_b"])), max_length=max_length,
                                        show_progress=show_progress) for f in (frames.train, frames.dev))
            result[f"probe_{name}"] = probe_scores(train, labels[0], dev, labels[1])
    return result
