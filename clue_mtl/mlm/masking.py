"""Whole-word masking from jieba for further pre-training (masked language modelling).

A masking *unit* is a group of tokens that is masked together or not at all. Units come from
words: jieba segments the text the tokenizer sees, and a token belongs to every word its
character span (the fast tokenizer's offsets) overlaps. A BERT-Chinese tokenizer gives one token
per character, so a unit is exactly a word. A sentencepiece piece of XLM-R may span several
characters and cross a word boundary (``今天天气`` one word, ``天气很`` one piece, ...): words
that share a token are merged into one unit, so a token is never half-masked.

Choosing: units are taken in a random order until ``mlm_probability`` of the sequence's maskable
(non-special) tokens are covered. The last unit, the one that would overshoot the quota, is taken
with probability ``remaining quota / its size``, which makes the covered fraction exactly
``mlm_probability`` in expectation, even for short sentences and multi-token words.

Replacing: at the *token* level, as in BERT's own whole-word masking: each chosen token becomes
the mask token with probability ``mask_replace_prob`` (0.8), a random non-special token with
``random_replace_prob`` (0.1), and stays unchanged otherwise. ``labels`` is the original id at
chosen tokens and -100 everywhere else; special tokens (the unknown token included: predicting
it teaches nothing), padding and sentencepiece's bare word-boundary piece ``▁`` are never chosen.
XLM-R writes ``▁`` alone before most Chinese words (about 4% of the corpus's tokens): it carries
no content, and masking it would spend that share of the budget on a token every model predicts,
inflating masked-token accuracy.

Every random draw of a row is made over the row's own tokens, row after row, so a row's masking
depends on the seed and the rows before it, never on how far the batch is padded (a held-out
figure on CPU is the figure on a GPU padding to a multiple of 8).

Pairs: with a BERT-style tokenizer a ``(text_a, text_b)`` pair's features carry ``token_type_ids``
(1 on text B and its closing [SEP]) and the batch passes them on, zero-padded; single texts and
tokenizers without segment ids (XLM-R) give batches without them. WordPiece: a BERT-Chinese
tokenizer gives one token per Chinese character and ``##`` pieces for the rest of a Latin word or
a number; the offsets of both lie inside the jieba word, so a word's pieces form one unit.

Segmentation is the slow part (about 80 us a sentence) and tokenizing the next slowest, so both
can be done once per corpus text: ``collator.encode(texts)`` returns features (``input_ids`` and
``word_units``) that the collator accepts as they are, and each epoch then only re-samples the
mask. Raw texts passed to the collator are segmented through a cache.

Random numbers come from the collator's own ``torch.Generator``: the same seed gives the same
masks. In DataLoader worker processes the generator is re-seeded from the worker's seed (which
PyTorch draws anew every epoch), so workers and epochs do not repeat each other's masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Union

import torch

from clue_mtl.data.batching import makes_token_type_ids

Span = tuple[int, int]
Segmenter = Callable[[str], Sequence[Span]]
Text = Union[str, tuple[str, str]]  # a single text or a sentence pair

_jieba = None


def jieba_spans(text: str) -> list[Span]:
    """Character spans ``(start, end)`` of jieba's words in ``text`` (they tile the text)."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return [(start, end) for _, start, end in _jieba.tokenize(text)]


def segment(texts: Iterable[str], segmenter: Segmenter = jieba_spans) -> list[list[Span]]:
    """Word spans of every text; compute once per corpus and pass to ``WholeWordMaskCollator``."""
    return [[(int(s), int(e)) for s, e in segmenter(text)] for text in texts]


def word_units(
    offsets: Sequence[Span],
    sequence_ids: Sequence[int | None],
    maskable: Sequence[bool],
    spans: Sequence[Sequence[Span]],
    lengths: Sequence[int],
) -> list[int]:
    """The masking unit of every token: 0, 1, 2, ... in token order, -1 for tokens never masked.

    ``offsets`` are the tokens' character spans within their own text, ``sequence_ids`` say which
    text (0 or 1 of a pair; None for special tokens), ``spans[k]`` are the word spans of text k
    and ``lengths[k]`` its length. A token joins the previous token's unit when they overlap a
    common word (or words chained by other tokens); a token that covers no word is a unit alone.
    """
    word_of_char = []
    for text_spans, length in zip(spans, lengths):
        chars = [-1] * length
        for w, (start, end) in enumerate(text_spans):
            chars[start:end] = [w] * (end - start)
        word_of_char.append(chars)

    units, unit, last_seq, last_word = [], -1, None, None
    for (start, end), seq, ok in zip(offsets, sequence_ids, maskable):
        if seq is None:
            units.append(-1)
            last_seq = last_word = None
            continue
        if not ok:  # e.g. <unk>: never masked, but a word around it stays one unit
            units.append(-1)
            continue
        words = [w for w in word_of_char[seq][start:end] if w >= 0]
        if words and seq == last_seq and last_word is not None and min(words) <= last_word:
            last_word = max(last_word, max(words))
        else:
            unit += 1
            last_seq, last_word = seq, (max(words) if words else None)
        units.append(unit)
    return units


def blank_piece_ids(tokenizer) -> list[int]:
    """Ids of the tokens that are only a sentencepiece word boundary (XLM-R's ``▁``); none in WordPiece."""
    vocab = tokenizer.get_vocab()
    return [vocab[piece] for piece in ("\u2581",) if piece in vocab and vocab[piece] != tokenizer.unk_token_id]


class WholeWordMaskCollator:
    """Turns texts (or features from ``encode``) into a padded masked-LM batch.

    Call it on a list whose items are strings, ``(text_a, text_b)`` pairs, or dicts with
    ``input_ids`` and ``word_units`` (from ``encode``). Returns ``input_ids``, ``attention_mask``
    and ``labels``, padded to the longest item (or a multiple of ``pad_to_multiple_of``), and
    ``token_type_ids`` when any item carries them (BERT-style pairs).
    """

    def __init__(
        self,
        tokenizer,
        mlm_probability: float = 0.15,
        *,
        seed: int | None = None,
        max_length: int = 128,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        pad_to_multiple_of: int | None = None,
        segmenter: Segmenter = jieba_spans,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("whole-word masking needs a fast tokenizer (character offsets)")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must lie in (0, 1), not {mlm_probability}")
        if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
            raise ValueError("mask_replace_prob and random_replace_prob must be >= 0 and sum to <= 1")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a mask token and a pad token")
        self.tokenizer = tokenizer
        self.mlm_probability = mlm_probability
        self.max_length = max_length
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.segmenter = segmenter
        self.word_spans: dict[str, list[Span]] = {}  # the segmentation cache
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.blank_ids = frozenset(blank_piece_ids(tokenizer))
        self.random_ids = torch.tensor([i for i in range(len(tokenizer))
                                        if i not in self.special_ids and i not in self.blank_ids])
        self.seed = int(torch.randint(2**62, ())) if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)
        self._worker_seed: int | None = None

    # ---- segmentation and tokenization (once per text) ----

    def segment(self, texts: Iterable[str]) -> list[list[Span]]:
        """Word spans of ``texts``, through the cache; call once on the corpus to pre-fill it."""
        texts = list(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self.word_spans))
        for text, spans in zip(todo, segment(todo, self.segmenter)):
            self.word_spans[text] = spans
        return [self.word_spans[t] for t in texts]

    def encode(self, texts: Sequence[Text]) -> list[dict[str, list[int]]]:
        """Tokenize and group into masking units: ``{"input_ids", "word_units"}`` per text, and
        ``token_type_ids`` for a pair when the tokenizer makes segment ids."""
        features: list[dict | None] = [None] * len(texts)
        singles = [i for i, t in enumerate(texts) if isinstance(t, str)]
        pairs = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        for index, is_pair in ((singles, False), (pairs, True)):
            if not index:
                continue
            parts = [(texts[i],) if not is_pair else tuple(texts[i]) for i in index]
            if is_pair and any(len(p) != 2 for p in parts):
                raise ValueError("a text is a string or a (text_a, text_b) pair")
            columns = list(zip(*parts))
            encoding = self.tokenizer(
                list(columns[0]),
                list(columns[1]) if is_pair else None,
                truncation=True,
                max_length=self.max_length,
                return_offsets_mapping=True,
                return_attention_mask=False,
                return_token_type_ids=is_pair and makes_token_type_ids(self.tokenizer),
            )
            spans = [self.segment(column) for column in columns]
            for row, i in enumerate(index):
                ids = encoding["input_ids"][row]
                units = word_units(
                    encoding["offset_mapping"][row],
                    encoding.sequence_ids(row),
                    [token not in self.special_ids and token not in self.blank_ids for token in ids],
                    [column_spans[row] for column_spans in spans],
                    [len(column[row]) for column in columns],
                )
                features[i] = {"input_ids": ids, "word_units": units}
                if "token_type_ids" in encoding:
                    features[i]["token_type_ids"] = encoding["token_type_ids"][row]
        return features

    # ---- masking (every batch) ----

    def __call__(self, items: Sequence[Text | dict]) -> dict[str, torch.Tensor]:
        raw = [i for i, item in enumerate(items) if not isinstance(item, dict)]
        features = list(items)
        for i, feature in zip(raw, self.encode([items[i] for i in raw])):
            features[i] = feature
        generator = self._generator()

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(features), longest)
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        chosen = torch.zeros(shape, dtype=torch.bool)
        draw = torch.ones(shape)  # padding: never replaced
        random_ids = torch.zeros(shape, dtype=torch.long)
        for row, feature in enumerate(features):  # each row's draws over its own tokens
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            chosen[row, :n] = self._choose(torch.tensor(feature["word_units"], dtype=torch.long), generator)
            draw[row, :n] = torch.rand(n, generator=generator)
            random_ids[row, :n] = self.random_ids[torch.randint(len(self.random_ids), (n,), generator=generator)]

        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        segments = self._token_type_ids(features, shape)
        to_mask = chosen & (draw < self.mask_replace_prob)
        to_random = chosen & ~to_mask & (draw < self.mask_replace_prob + self.random_replace_prob)
        input_ids = torch.where(to_mask, torch.full_like(input_ids, self.tokenizer.mask_token_id), input_ids)
        input_ids = torch.where(to_random, random_ids, input_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return batch if segments is None else batch | {"token_type_ids": segments}

    @staticmethod
    def _token_type_ids(features: Sequence[dict], shape: tuple[int, int]) -> torch.Tensor | None:
        """Zero-padded segment ids, when any feature has them (the others are single texts: 0)."""
        if not any("token_type_ids" in f for f in features):
            return None
        segments = torch.zeros(shape, dtype=torch.long)
        for row, feature in enumerate(features):
            if "token_type_ids" in feature:
                segments[row, :len(feature["token_type_ids"])] = torch.as_tensor(feature["token_type_ids"])
        return segments

    def _choose(self, units: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Which tokens of one sequence to predict: whole units, ``mlm_probability`` on average."""
        maskable = units >= 0
        if not maskable.any():
            return maskable
        sizes = torch.bincount(units[maskable])
        order = torch.randperm(len(sizes), generator=generator)
        quota = self.mlm_probability * int(maskable.sum())
        covered = sizes[order].cumsum(0)
        taken = int((covered <= quota).sum())  # a prefix, since every unit has a token
        if taken < len(order):
            so_far = float(covered[taken - 1]) if taken else 0.0
            if float(torch.rand((), generator=generator)) * float(sizes[order[taken]]) < quota - so_far:
                taken += 1
        picked = torch.zeros(len(sizes), dtype=torch.bool)
        picked[order[:taken]] = True
        return maskable & picked[units.clamp(min=0)]

    def _generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator.manual_seed((self.seed * 1_000_003 + info.seed) % 2**63)
        return self.generator

    # ---- exact resume ----

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
