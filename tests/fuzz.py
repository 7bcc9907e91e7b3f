"""Fuzzers for the command line's promise: bad input gives `error: ...` and exit 2, never a traceback;
a test file's content never stops a submission.

    python tests/fuzz.py data --cases 120 --seed 0     # corrupted data files through `check-data`, `baseline`
    python tests/fuzz.py zip --cases 60 --seed 0       # hostile submission zips through `score`
    python tests/fuzz.py config --cases 200 --seed 0   # hostile configs through `train` and `predict`

Each case runs `clue_mtl.cli.main` in this process and counts: tracebacks (an exception escaping
`main`, or its exit 1 for an internal fault), wrong exits (any status but the one the case calls
for: 2 for structure, 0 for content the kit mends), missing locations (a message or warning that
does not name the file, and the line where one was corrupted), and incomplete zips (a test file
with mended content whose zip lacks a row).
`tests/test_fuzz.py` runs a small sample of each with a fixed seed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from clue_mtl.cli import main
from clue_mtl.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]

SHARED_DATA = ROOT.parent / "shared" / "data" / "tianchi"


@dataclass
class Tally:
    cases: int = 0
    tracebacks: int = 0
    wrong_exits: int = 0
    missing_location: int = 0
    incomplete_zips: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self, name: str, argv: list[str], expected: list[str], *, status_wanted: int = 2) -> bool:
        """Run one case; `expected` are strings the messages must contain (every one, in some line)."""
        self.cases += 1
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = main(argv)
        except BaseException as error:  # noqa: BLE001 - the point is to catch anything
            self.tracebacks += 1
            self.failures.append(f"{name}: traceback {type(error).__name__}: {error!s:.200}")
            return False
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if status == 1:
            self.tracebacks += 1
            self.failures.append(f"{name}: internal fault: {lines[-1] if lines else ''}")
        elif status != status_wanted:
            self.wrong_exits += 1
            self.failures.append(f"{name}: exit {status}: {lines[:2]}")
        elif not all(any(text in line for line in lines) for text in expected) or (status_wanted and not lines):
            self.missing_location += 1
            self.failures.append(f"{name}: expected {expected} in {lines[:3]}")
        else:
            return True
        return False

    def check_zip(self, name: str, path: Path, member: str, ids: list[str]) -> None:
        """The zip holds one line per test row, with the file's ids in file order."""
        try:
            with zipfile.ZipFile(path) as archive:
                written = [json.loads(line)["id"] for line in archive.read(member).decode().splitlines()]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
            written = [f"unreadable: {error}"]
        if written != ids:
            self.incomplete_zips += 1
            self.failures.append(f"{name}: {path.name}:{member} has {len(written)} lines for {len(ids)} rows")

    def summary(self, what: str) -> str:
        return (f"{what} fuzzer: {self.cases} cases, {self.tracebacks} tracebacks, {self.wrong_exits} wrong exits, "
                f"{self.missing_location} missing FILE:LINE, {self.incomplete_zips} incomplete zips")


# ----------------------------------------------------------------------------- data files
# Structure makes a row ambiguous: `check-data` refuses with FILE:LINE and exit 2.
STRUCTURE_KINDS = ("extra_tab", "missing_column", "unknown_label", "duplicate_id", "empty_id", "bom_in_id",
                   "space_in_id", "bad_utf8_in_id", "truncated")
# Content is mended: `check-data` warns with FILE:LINE and exits 0, and a test file's zip is complete.
CONTENT_KINDS = ("bad_utf8", "empty_text", "blank_line", "nul_in_text", "cr_in_text", "del_in_text", "c1_in_text",
                 "invisible_text", "ideographic_space", "trailing_tab", "header_row")
FILE_KINDS = ("folder", "fifo", "symlink_loop", "empty_file", "case_variants", "wrong_kind", "cr_only", "binary")
ROW_KINDS = STRUCTURE_KINDS + CONTENT_KINDS
DATA_KINDS = ROW_KINDS + FILE_KINDS


def small_data(source: Path, target: Path, rows: int = 40) -> None:
    target.mkdir(parents=True)
    for task in TASKS.values():
        for name in (task.train_file, task.test_a_file, task.test_b_file):
            lines = (source / name).read_bytes().split(b"\r\n")[:rows]
            (target / name).write_bytes(b"\r\n".join(lines) + b"\r\n")


def corrupt_row(kind: str, fields: list[bytes], labelled: bool, previous_id: bytes) -> list[bytes] | bytes:
    """The row's fields corrupted (or the raw line, for kinds that break the columns)."""
    text = 1  # the first text column
    inside = {"nul_in_text": b"\x00", "cr_in_text": b"\r", "del_in_text": b"\x7f", "c1_in_text": "\u0085".encode(),
              "bad_utf8": b"\xff\xfe"}
    if kind in inside:
        fields[text] = fields[text][:2] + inside[kind] + fields[text][2:]
    elif kind == "extra_tab":
        fields[text] = fields[text][:1] + b"\t" + fields[text][1:]
    elif kind == "missing_column":  # the id's tab lost: the id runs into the first text
        return b"\t".join([fields[0] + fields[1], *fields[2:]])
    elif kind == "unknown_label":
        fields[-1] = b"no-such-label"
    elif kind == "duplicate_id":
        fields[0] = previous_id
    elif kind == "empty_id":
        fields[0] = b""
    elif kind == "empty_text":
        fields[text] = b"  "
    elif kind == "bom_in_id":
        fields[0] = "\ufeff".encode() + fields[0]
    elif kind == "space_in_id":
        fields[0] = fields[0] + b" 7"
    elif kind == "bad_utf8_in_id":
        fields[0] = fields[0] + b"\xff"
    elif kind == "invisible_text":
        fields[text] = "\u200b\u200b".encode()
    elif kind == "ideographic_space":
        fields[text] = "\u3000".encode()
    elif kind == "trailing_tab":
        fields.append(b"")
    elif kind == "truncated":
        return fields[0][: max(1, len(fields[0]) // 2)]
    return fields


def corrupt_file(kind: str, path: Path, folder: Path, name: str) -> list[str]:
    """Make `path` a file fault of `kind`; the strings the refusal must hold."""
    if kind == "folder":
        path.unlink(), path.mkdir()
    elif kind == "fifo":
        path.unlink(), os.mkfifo(path)
    elif kind == "symlink_loop":
        path.unlink(), path.symlink_to(path.name)
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "case_variants":
        shutil.copyfile(path, folder / name.upper() if name != name.upper() else folder / name.lower())
        return [f"{folder}: ambiguous"]
    elif kind == "cr_only":
        path.write_bytes(path.read_bytes().replace(b"\r\n", b"\r"))
        return [f"{path}: its lines end in CR alone"]
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 40)
        return [f"{path}: not a UTF-8 text file"]
    return [f"{path}"]


def data_case(rng: random.Random, kind: str, folder: Path) -> tuple[Path, int, list[str]]:
    """Corrupt one file of `folder` by `kind`: (the file, the 1-based line changed (0: the file),
    the strings the message must hold)."""
    task = rng.choice(list(TASKS.values()))
    names = [task.train_file, task.test_a_file, task.test_b_file]
    name = task.train_file if kind in ("unknown_label", "wrong_kind") else rng.choice(names)
    path = folder / name
    if kind in FILE_KINDS:
        if kind == "wrong_kind":
            shutil.copyfile(folder / task.test_a_file, path)
        return path, 0, corrupt_file(kind, path, folder, name)
    lines = path.read_bytes().split(b"\r\n")[:-1]
    number = rng.randrange(2, len(lines) + 1)  # 1-based; from 2 so a BOM is not the file's own
    if kind == "blank_line":
        lines.insert(number - 1, b"")
    elif kind == "header_row":
        number = 1
        lines.insert(0, b"\t".join([b"id", *[b"text"] * task.text_columns, *([b"label"] if name == task.train_file else [])]))
    else:
        fields = lines[number - 1].split(b"\t")
        row = corrupt_row(kind, fields, name == task.train_file, lines[number - 2].split(b"\t")[0])
        lines[number - 1] = row if isinstance(row, bytes) else b"\t".join(row)
        if kind == "truncated":
            lines = lines[:number]
    path.write_bytes(b"\r\n".join(lines) + (b"" if kind == "truncated" else b"\r\n"))
    return path, number, [f"{path}:{number}:"]


def test_ids(path: Path) -> list[str]:
    """The ids a test file's zip must hold: every row's, in file order (no header, no blank line)."""
    lines = [line for line in path.read_bytes().split(b"\r\n") if line.strip()]
    return [line.split(b"\t")[0].decode() for line in lines if not line.startswith(b"id\t")]


def fuzz_data(cases: int, seed: int, data_dir: Path = SHARED_DATA) -> Tally:
    """Structure: `check-data` exits 2 naming FILE:LINE. Content: it exits 0 with a warning naming
    FILE:LINE, and `baseline` writes zips whose corrupted member has every row of its test file."""
    rng, tally = random.Random(seed), Tally()
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        small_data(data_dir, clean)
        for number in range(cases):
            kind = DATA_KINDS[number % len(DATA_KINDS)]
            folder = Path(tmp) / f"case-{number}"
            shutil.copytree(clean, folder, symlinks=True)
            path, line, expected = data_case(rng, kind, folder)
            name = f"data {number} {kind}"
            if kind not in CONTENT_KINDS:
                tally.run(name, ["check-data", "--data-dir", str(folder)], expected)
            elif tally.run(name, ["check-data", "--data-dir", str(folder)], [f"warning: {path}:{line}:"],
                           status_wanted=0):
                _predict_content_case(tally, name, path, folder, Path(tmp) / f"out-{number}")
            shutil.rmtree(folder, ignore_errors=True)
    return tally


def _predict_content_case(tally: Tally, name: str, path: Path, folder: Path, out: Path) -> None:
    """The baseline trains on the corrupted folder and predicts every test row."""
    argv = ["baseline", "--data-dir", str(folder), "--out-dir", str(out), "--run-dir", str(out / "run")]
    if not tally.run(f"{name} baseline", argv, [], status_wanted=0):
        return
    task = next(task for task in TASKS.values() if path.name in (task.train_file, task.test_a_file, task.test_b_file))
    if path.name != task.train_file:
        split = "a" if path.name == task.test_a_file else "b"
        tally.check_zip(name, out / f"baseline_test_{split}.zip", task.submission_member, test_ids(path))


# ----------------------------------------------------------------------------- submission zips
GOLD_ROWS = 10


def gold_files(folder: Path) -> list[str]:
    specs = []
    for task in TASKS.values():
        texts = "\ttext" * task.text_columns
        rows = [f"{i}{texts}\t{task.labels[i % len(task.labels)]}" for i in range(GOLD_ROWS)]
        path = folder / task.train_file
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        specs += ["--gold", f"{task.name}={path}"]
    return specs


def good_members() -> dict[str, bytes]:
    return {task.submission_member: "".join(json.dumps({"id": str(i), "label": task.labels[0]}) + "\n"
                                            for i in range(GOLD_ROWS)).encode() for task in TASKS.values()}


def _line(member: bytes, number: int, line: bytes) -> bytes:
    lines = member.split(b"\n")
    lines[number - 1] = line
    return b"\n".join(lines)


def zip_case(rng: random.Random, kind: str, path: Path) -> list[str]:
    """Write a hostile zip of `kind` to `path`; the strings its error must hold."""
    members = good_members()
    member = rng.choice(sorted(members))
    number = rng.randrange(1, GOLD_ROWS + 1)
    line_level = {
        "not_json": b"{not json", "wrong_keys": b'{"id": "0"}', "int_id": b'{"id": 0, "label": "x"}',
        "huge_id": b'{"id": ' + b"9" * 5000 + b', "label": "0"}', "deep": b"[" * 100000 + b"]" * 100000,
        "unknown_label": b'{"id": "0", "label": "nope"}', "blank": b"", "list_line": b"[1, 2]",
        "null_label": b'{"id": "1", "label": null}', "bad_utf8": b'{"id": "\xff", "label": "0"}',
        "nan_id": b'{"id": NaN, "label": "0"}', "duplicate": b"",
    }
    if kind in line_level:
        line = line_level[kind]
        if kind == "duplicate":
            line = members[member].split(b"\n")[0]
            number = max(number, 2)
        members[member] = _line(members[member], number, line)
        _write_zip(path, members)
        return [path.name, member] + ([] if kind == "bad_utf8" else [f"line {number}"])
    if kind == "not_a_zip":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "empty_zip":
        _write_zip(path, {})
    elif kind == "truncated":
        _write_zip(path, members)
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(10, len(data) - 10)])
    elif kind == "missing_member":
        del members[member]
        _write_zip(path, members)
    elif kind == "unexpected_member":
        _write_zip(path, {**members, "extra.txt": b"hello"})
    elif kind == "nested":
        _write_zip(path, {**{k: v for k, v in members.items() if k != member}, f"dir/{member}": members[member]})
    elif kind in ("traversal", "absolute"):
        _write_zip(path, {**members, ("../evil.json" if kind == "traversal" else "/etc/evil.json"): b"x"})
    elif kind == "twice":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in [*members.items(), (member, members[member])]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    archive.writestr(name, data)
    elif kind == "bomb":
        _write_zip(path, {**members, member: b"\n" * (40 << 20)}, zipfile.ZIP_DEFLATED)
    elif kind == "lying_size":
        _write_zip(path, members)
        data = bytearray(path.read_bytes())
        at = data.find(b"PK\x01\x02")  # central directory: uncompressed size at offset 24
        data[at + 24:at + 28] = (1).to_bytes(4, "little")
        path.write_bytes(bytes(data))
    elif kind == "encrypted":
        _write_zip(path, members)
        data = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = -1
            while (at := data.find(signature, at + 1)) >= 0:
                data[at + offset] |= 1
        path.write_bytes(bytes(data))
    elif kind == "bad_method":
        _write_zip(path, members)
        data = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            at = -1
            while (at := data.find(signature, at + 1)) >= 0:
                data[at + offset:at + offset + 2] = (99).to_bytes(2, "little")
        path.write_bytes(bytes(data))
    elif kind == "corrupt_data":
        _write_zip(path, members, zipfile.ZIP_DEFLATED)
        data = bytearray(path.read_bytes())
        at = data.find(b"PK\x03\x04") + 30 + len(sorted(members)[0]) + 2
        data[at:at + 4] = b"\xde\xad\xbe\xef"
        path.write_bytes(bytes(data))
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink_member":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777 << 16) if name == member else (0o644 << 16)
                archive.writestr(info, b"/etc/passwd" if name == member else data)
    return [path.name]


ZIP_KINDS = ("not_json", "wrong_keys", "int_id", "huge_id", "deep", "unknown_label", "blank", "list_line",
             "null_label", "bad_utf8", "nan_id", "duplicate", "not_a_zip", "empty_zip", "truncated",
             "missing_member", "unexpected_member", "nested", "traversal", "absolute", "twice", "bomb",
             "lying_size", "encrypted", "bad_method", "corrupt_data", "folder", "symlink_member")


def _write_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def fuzz_zips(cases: int, seed: int) -> Tally:
    rng, tally = random.Random(seed), Tally()
    with tempfile.TemporaryDirectory() as tmp:
        gold = gold_files(Path(tmp))
        for number in range(cases):
            kind = ZIP_KINDS[number % len(ZIP_KINDS)]
            path = Path(tmp) / f"case-{number}-{kind}.zip"
            expected = zip_case(rng, kind, path)
            tally.run(f"zip {number} {kind}", ["score", str(path), *gold], ["error: ", *expected])
    return tally


# ----------------------------------------------------------------------------- configs
def bad_values(kind: str) -> list:
    """Values a setting of this kind must refuse (every number setting refuses negatives)."""
    common = [[1], {"a": 1}]
    if kind == "float":
        return [float("nan"), float("inf"), float("-inf"), "1e309", -1.0, "fast", True, *common]
    if kind == "int":
        return [-1, 1.5, "many", True, None, *common]
    if kind == "bounded_int":
        return [-1, 10**400, 2**64, 1.5, "many", *common]
    if kind == "str":
        return [3, 1.5, None, *common]
    if kind == "structure":  # model.heads, model.private: task -> mapping of settings
        return [3, "san", None, [1], {"ocnli": 3}, {"ocnli": {"type": 5}}, {"ocnli": {"type": "nope"}},
                {"ocnli": {"steps": -1}}, {"ocnli": {"layers": 1.5}}, {"tnews": {"rank": 0}}, {"cmnli": {}}]
    return ["ocnli", 3, None, [], ["nope"]]  # data.tasks


KEYS = {  # key -> kind of value, for every setting that is a number, a name or a list
    **{f"train.{k}": "float" for k in ("lr", "head_lr", "layer_lr_decay", "weight_decay", "warmup_ratio",
                                       "grad_clip", "sampling_alpha", "ema_decay", "fgm_epsilon")},
    **{f"train.{k}": "int" for k in ("eval_every", "log_every", "early_stopping_patience")},
    **{f"train.{k}": "bounded_int" for k in ("steps", "batch_size", "grad_accumulation", "num_threads", "seed")},
    "data.dev_fraction": "float", "data.split_seed": "bounded_int", "data.max_length": "bounded_int",
    "model.dropout": "float", "model.head_hidden": "bounded_int", "weighting.lr": "float",
    "distill.mix": "float", "distill.temperature": "float",
    "train.sampling": "str", "train.mixed_precision": "str", "model.pooling": "str", "weighting.method": "str",
    "data.tasks": "tasks", "model.heads": "structure", "model.private": "structure",
}
BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
               for prev, name in zip([None, "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi"))
DOCUMENTS = {  # hostile config files: the message must name the file
    "alias_bomb": BOMB.encode(), "deep": b"train: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "syntax": b"train:\n  lr: [1, 2\n", "tab_indent": b"train:\n\tlr: 1\n", "non_utf8": b"name: \xff\xfe\n",
    "top_list": b"- train\n- lr\n", "top_scalar": b"just words\n", "python_tag": b"name: !!python/object/apply:os.system [echo hi]\n",
    "int_key": b"train:\n  1: 2\n", "bool_key": b"yes: 1\n", "duplicate_key": b"train:\n  lr: 1\n  lr: 2\n",
    "unknown_section": b"trian:\n  lr: 1\n", "unknown_key": b"train:\n  lrr: 1\n", "section_scalar": b"train: 3\n",
    "huge": b"name: x\n" + b"# padding\n" * 200000, "nul": b"name: a\x00b\n",
}


def config_cases(rng: random.Random, cases: int):
    """(name, file contents, the string the message must hold): every document, then key mutations."""
    yield from ((f"doc {name}", data, None) for name, data in DOCUMENTS.items())
    pairs = [(key, value) for key, kind in KEYS.items() for value in bad_values(kind)]
    for key, value in rng.sample(pairs, min(len(pairs), max(0, cases - len(DOCUMENTS)))):
        section, name = key.split(".")
        text = json.dumps({section: {name: value}}, allow_nan=True).replace("NaN", ".nan").replace(
            "-Infinity", "-.inf").replace("Infinity", ".inf")
        yield f"{key}={value!r:.30}", text.encode(), key


def fuzz_configs(cases: int, seed: int) -> Tally:
    rng, tally = random.Random(seed), Tally()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        (run / "best").mkdir(parents=True)
        (run / "best" / "model.safetensors").write_bytes(b"")
        for number, (name, data, key) in enumerate(config_cases(rng, cases)):
            path = Path(tmp) / f"case-{number}.yaml"
            path.write_bytes(data)
            expected = ["error: ", key or str(path)]
            tally.run(f"config {name}", ["train", "--config", str(path), "--run-dir", str(Path(tmp) / "never")],
                      expected)
            if key is None:  # the same file as a run folder's config, read by `predict`
                shutil.copyfile(path, run / "config.yaml")
                tally.run(f"run folder {name}", ["predict", "--run", str(run), "--out", str(Path(tmp) / "x.zip")],
                          ["error: ", str(run / "config.yaml")])
    return tally


FUZZERS = {"data": fuzz_data, "zip": fuzz_zips, "config": fuzz_configs}


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fuzzer", choices=sorted(FUZZERS))
    parser.add_argument("--cases", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tally = FUZZERS[args.fuzzer](args.cases, args.seed)
    print("\n".join(tally.failures[:30]))
    print(tally.summary(args.fuzzer))
    return 0 if not tally.failures else 1


if __name__ == "__main__":
    sys.exit(cli())
