"""Encoders: loading Hugging Face encoders by hub id or folder, and their layers.

- `load_encoder` / `ensure_encoder` load any `AutoModel` encoder by hub id or local folder;
  `ensure_encoder` first builds an offline encoder (`offline_encoders.OFFLINE_ENCODERS`: e5-small,
  m3e-small) when its folder, e.g. artifacts/m3e-small, is missing.
- `encoder_layers` lists the embedding module and the transformer layers, bottom to top.

Nothing here assumes [CLS]/[SEP], a vocab.txt or token-type ids: the tokenizer decides.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import torch
from torch import nn

from clue_mtl.errors import EncoderError
from clue_mtl.model.offline_encoders import OFFLINE_ENCODERS, build_offline_encoder

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

    `model_kwargs` go to `AutoModel.from_pretrained`. The weights load in float32 unless
    `dtype` says otherwise: transformers 5 keeps a checkpoint's own dtype, and an encoder saved
    in bf16 (as one carried to a GPU is) would otherwise train bf16 master weights. The pooler is
    removed after loading unless `pooler=True` (loading it and dropping it keeps the load report
    clean). Errors say what to do when a local folder is missing or the hub cannot be reached.
    """
    from transformers import AutoModel, AutoTokenizer

    model_kwargs.setdefault("dtype", torch.float32)
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
def layer_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the encoder's list of transformer layers, and the attribute holding it
    (so a task can run the encoder with a list of its own: `private.PrivateLayers`)."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        *parents, name = path.split(".")
        owner = model
        for attr in parents:
            owner = getattr(owner, attr, None)
        if isinstance(getattr(owner, name, None), nn.ModuleList) and len(getattr(owner, name)):
            return owner, name
    # best effort: the longest ModuleList whose members all share one class
    best = None
    for owner_name, owner in model.named_modules():
        for name, mod in owner.named_children():
            if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
                if best is None or len(mod) > len(getattr(*best)):
                    best = (owner, name)
    if best is None:
        raise ValueError(f"no list of transformer layers found in {type(model).__name__}")
    return best


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return getattr(*layer_slot(model))


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
