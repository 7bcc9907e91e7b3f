"""Vocabulary trimming: keep only the embedding rows the competition text uses.

multilingual-e5-small has 250,037 embedding rows (about 96M of its 118M parameters); the three
tasks' text uses a few percent of them. `trim_vocabulary` tokenizes a corpus, keeps the tokens
that occur plus every special token, renumbers them (old order kept, so `<s> <pad> </s> <unk>`
stay 0-3 for XLM-R), rewrites the tokenizer to the kept tokens and slices the word embedding
(and a masked-LM head's decoder rows and bias) to match.

On corpus text the trimmed encoder is the original one under a renumbering: same segmentation,
same hidden states. Unigram (sentencepiece) segmentation picks the best-scoring path; every
piece of the original best path is kept and no piece is added, so the best path survives
(`trim_vocabulary` re-encodes the corpus and checks it). On other text a trimmed Unigram model
may segment differently, and characters outside the kept pieces become `<unk>` (runs of them
fuse into one); `unknown_rate` measures how often.

Supports tokenizer.json models of type Unigram (XLM-R, e5) and WordPiece (BERT).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

TRIM_FILE = "vocabulary_trim.json"  # in the trimmed folder: old id of every new id, provenance
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                    "cls_token_id", "unk_token_id", "mask_token_id", "decoder_start_token_id")


@dataclass(frozen=True)
class TrimReport:
    rows_before: int
    rows_after: int
    params_before: int
    params_after: int
    corpus_texts: int
    held_out_texts: int
    held_out_unknown_rate: float | None  # fraction of held-out tokens that are <unk> after trimming

    def __str__(self) -> str:
        text = (f"vocabulary {self.rows_before:,} -> {self.rows_after:,} rows, parameters "
                f"{self.params_before:,} -> {self.params_after:,}, from {self.corpus_texts:,} texts")
        if self.held_out_unknown_rate is not None:
            text += (f"; unknown rate on {self.held_out_texts:,} held-out texts "
                     f"{self.held_out_unknown_rate:.4%}")
        return text


def corpus_texts(data_dir: str | Path, splits: Sequence[str] = ("train", "a", "b")) -> list[str]:
    """Every normalised text of the three tasks' training, test A and test B files (or of the
    named `splits`), once each.

    Order: tasks in registry order, splits as given, rows in file order, text_a before text_b.
    """
    from clue_mtl.data.folder import load_split
    from clue_mtl.tasks import TASK_NAMES

    texts: dict[str, None] = {}
    for task in TASK_NAMES:
        for split in splits:
            frame = load_split(data_dir, task, split)
            columns = [frame["text_a"]] + ([frame["text_b"]] if frame["text_b"].notna().all() else [])
            for row in zip(*columns):
                texts.update(dict.fromkeys(row))
    return list(texts)


def corpus_pairs(data_dir: str | Path, splits: Sequence[str] = ("train", "a", "b")) -> list[tuple[str, str]]:
    """Every normalised `(text_a, text_b)` pair of the pair tasks (OCNLI) in those files, once each,
    in `corpus_texts`'s order."""
    from clue_mtl.data.folder import load_split
    from clue_mtl.tasks import TASK_NAMES

    pairs: dict[tuple[str, str], None] = {}
    for task in TASK_NAMES:
        for split in splits:
            frame = load_split(data_dir, task, split)
            if frame["text_b"].notna().all():
                pairs.update(dict.fromkeys(zip(frame["text_a"], frame["text_b"])))
    return list(pairs)


def token_ids(tokenizer, texts: Sequence[str], batch_size: int = 4096) -> list[list[int]]:
    """Token ids of every text, without special tokens and without truncation."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        ids += tokenizer(batch, add_special_tokens=False, truncation=False)["input_ids"]
    return ids


def unknown_rate(tokenizer, texts: Sequence[str]) -> float:
    """Fraction of the tokens of `texts` that are the unknown token (0.0 when there are none)."""
    unk = tokenizer.unk_token_id
    total = hits = 0
    for ids in token_ids(tokenizer, texts):
        total += len(ids)
        hits += sum(1 for i in ids if i == unk)
    return hits / total if total else 0.0


def trim_tokenizer_json(spec: dict, keep: Sequence[int]) -> dict:
    """A tokenizer.json (as a dict) reduced to the token ids `keep` (ascending), renumbered 0.."""
    new_id = {old: new for new, old in enumerate(keep)}
    spec = copy.deepcopy(spec)
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][i] for i in keep if i < len(model["vocab"])]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    elif model["type"] == "WordPiece":
        token_of = {i: token for token, i in model["vocab"].items()}
        model["vocab"] = {token_of[i]: new_id[i] for i in keep if i in token_of}
    else:
        raise NotImplementedError(f"trimming a {model['type']} tokenizer model is not supported "
                                  "(Unigram and WordPiece are)")
    for token in spec.get("added_tokens") or []:
        token["id"] = new_id[token["id"]]
    spec["post_processor"] = _remap_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    return spec


def _remap_processor(processor: dict | None, new_id: dict[int, int]) -> dict | None:
    if processor is None:
        return None
    kind = processor["type"]
    if kind == "Sequence":
        processor["processors"] = [_remap_processor(p, new_id) for p in processor["processors"]]
    elif kind == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, old = processor[key]
            processor[key] = [token, new_id[old]]
    elif kind != "ByteLevel":
        raise NotImplementedError(f"cannot renumber a {kind} post-processor")
    return processor


def load_full_model(encoder_dir: str | Path):
    """The model saved in `encoder_dir`, as its saved architecture (a masked-LM head included)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(encoder_dir)
    name = (config.architectures or ["AutoModel"])[0]
    model_cls = getattr(transformers, name, None) or transformers.AutoModel
    return model_cls.from_pretrained(encoder_dir)


def _vocab_tensor_names(model, rows: int) -> set[str]:
    """State-dict names of the tensors indexed by token id: the word embedding, the output
    embedding's weight and bias, and anything sharing their storage (a tied LM-head bias)."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    pointers = {p.data_ptr() for m in modules if m is not None
                for p in m.parameters(recurse=False) if p.shape[0] == rows}
    return {name for name, t in model.state_dict().items()
            if t.data_ptr() in pointers and t.shape[0] == rows}


def trim_model(model, keep: Sequence[int]):
    """A copy of `model` whose token-indexed rows are `keep` (old ids, in new-id order)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if max(keep) >= rows:
        raise ValueError(f"token id {max(keep)} is outside the {rows}-row embedding")
    index = torch.tensor(keep, dtype=torch.long)
    names = _vocab_tensor_names(model, rows)
    state = {name: t.index_select(0, index).clone() if name in names else t
             for name, t in model.state_dict().items()}
    new_id = {old: new for new, old in enumerate(keep)}
    config = copy.deepcopy(model.config)
    config.vocab_size = len(keep)
    for field in _TOKEN_ID_FIELDS:
        old = getattr(config, field, None)
        if isinstance(old, int) and old in new_id:
            setattr(config, field, new_id[old])
    trimmed = type(model)(config).to(model.dtype)
    trimmed.load_state_dict(state)
    return trimmed.eval()


def trim_vocabulary(encoder_dir: str | Path, out_dir: str | Path, texts: Iterable[str], *,
                    held_out: Sequence[str] = ()) -> TrimReport:
    """Save to `out_dir` the encoder of `encoder_dir` reduced to the tokens `texts` use.

    Kept: every token id that occurs in `texts` and every special (added) token, in the old
    order. The model keeps its architecture (a masked-LM head is trimmed too) and is saved with
    `save_pretrained` (safetensors); `out_dir/vocabulary_trim.json` lists the old id of every new
    id. Raises if the trimmed tokenizer segments any corpus text differently. `held_out` texts
    (not in the corpus, e.g. new test data) give the report's unknown rate.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    encoder_dir, out_dir = Path(encoder_dir), Path(out_dir)
    texts = list(dict.fromkeys(texts))
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("trimming needs a tokenizers-backed (fast) tokenizer with a tokenizer.json")
    model = load_full_model(encoder_dir)
    rows_before = model.get_input_embeddings().weight.shape[0]

    corpus_ids = token_ids(tokenizer, texts)
    used = {i for ids in corpus_ids for i in ids}
    keep = sorted(used | set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids))
    new_id = {old: new for new, old in enumerate(keep)}

    spec = trim_tokenizer_json(json.loads(tokenizer.backend_tokenizer.to_str()), keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    for stale in ("vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json", "merges.txt"):
        (out_dir / stale).unlink(missing_ok=True)
    Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)).save(str(out_dir / "tokenizer.json"))
    trimmed_tokenizer = AutoTokenizer.from_pretrained(out_dir)

    changed = [t for t, old, new in zip(texts, corpus_ids, token_ids(trimmed_tokenizer, texts))
               if [new_id[i] for i in old] != new]
    if changed:
        raise RuntimeError(f"the trimmed tokenizer segments {len(changed)} corpus texts differently, "
                           f"e.g. {changed[0]!r}")

    trimmed = trim_model(model, keep)
    trimmed.save_pretrained(out_dir)
    (out_dir / TRIM_FILE).write_text(json.dumps(
        {"source": str(encoder_dir), "corpus_texts": len(texts), "old_ids": keep}) + "\n")
    return TrimReport(
        rows_before=rows_before,
        rows_after=len(keep),
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in trimmed.parameters()),
        corpus_texts=len(texts),
        held_out_texts=len(held_out),
        held_out_unknown_rate=unknown_rate(trimmed_tokenizer, held_out) if held_out else None,
    )
