"""`minillm download NAME`: fetch a public corpus into data/ and convert it to a schema we read.

With ``--from PATH`` the same conversion runs on a local copy (no network), which is also how the
conversions are tested.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from minillm_lightning.commands import CommandParser
from minillm_lightning.errors import KIND_NAMES, DataError, MiniLLMError, field_state, type_name

HF = "https://huggingface.co/datasets"


@dataclass(frozen=True)
class Corpus:
    url: str
    output: str
    about: str
    convert: str = "copy"  # "copy" or "hh" (Anthropic HH-RLHF -> minimind preference schema)
    fields: tuple[tuple[str, type], ...] = ()
    """Fields (and their JSON types) every record of a copied JSON(L) corpus has; checked on a sample of ``--from``."""


CORPORA: dict[str, Corpus] = {
    "tinyshakespeare": Corpus(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "data/tinyshakespeare/input.txt",
        "Tiny Shakespeare, 1.1 MB of plain text (pretraining; configs/shakespeare_*.yaml)",
    ),
    "minimind-pretrain": Corpus(
        f"{HF}/jingyaogong/minimind_dataset/resolve/main/pretrain_hq.jsonl",
        "data/real/pretrain/minimind_pretrain_hq.jsonl",
        'minimind pretraining corpus, {"text"} lines, ~1.6 GB (Chinese)',
        fields=(("text", str),),
    ),
    "minimind-sft": Corpus(
        f"{HF}/jingyaogong/minimind_dataset/resolve/main/sft_mini_512.jsonl",
        "data/real/sft/minimind_sft_mini_512.jsonl",
        'minimind SFT conversations, {"conversations": [{"role","content"}]}, ~1.2 GB',
        fields=(("conversations", list),),
    ),
    "minimind-dpo": Corpus(
        f"{HF}/jingyaogong/minimind_dataset/resolve/main/dpo.jsonl",
        "data/real/preference/minimind_dpo.jsonl",
        'minimind preference pairs, {"chosen": [msgs], "rejected": [msgs]}',
        fields=(("chosen", list), ("rejected", list)),
    ),
    "alpaca": Corpus(
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
        "data/alpaca/alpaca_data.json",
        'Stanford Alpaca, 52k {"instruction","input","output"} (SFT, read as-is)',
        fields=(("instruction", str), ("output", str)),
    ),
    "hh-rlhf": Corpus(
        f"{HF}/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz",
        "data/real/preference/hh_rlhf_helpful_base.jsonl",
        "Anthropic HH-RLHF helpful-base, converted to our preference schema (reward/DPO)",
        convert="hh",
    ),
}


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into chat messages."""
    messages: list[dict[str, str]] = []
    for chunk in text.split("\n\nHuman: ")[1:] if "\n\nHuman: " in text else []:
        human, *assistant_parts = chunk.split("\n\nAssistant: ")
        messages.append({"role": "user", "content": human.strip()})
        for part in assistant_parts:
            messages.append({"role": "assistant", "content": part.strip()})
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("transcript does not end with an Assistant turn")
    return messages


def convert_hh(lines: Iterator[str], write: Callable[[str], object], source: str = "input") -> tuple[int, int]:
    """HH-RLHF {"chosen": text, "rejected": text} lines -> {"chosen": [msgs], "rejected": [msgs]}.

    Raises:
        DataError: a line that is not a JSON object with string fields chosen and rejected (naming ``source`` and the
            line): not an HH-RLHF file.
    """
    kept = skipped = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{source}:{lineno}: not a JSON line ({e.msg}); expected HH-RLHF's train.jsonl(.gz)"
            ) from None
        if not isinstance(rec, dict):
            what = type(rec).__name__
            raise DataError(f"{source}:{lineno}: expected a JSON object with chosen/rejected, got {what}")
        for key in ("chosen", "rejected"):
            if not isinstance(rec.get(key), str):
                raise DataError(
                    f"{source}:{lineno}: field {key!r} is {field_state(rec, key)}, not a transcript string; expected "
                    f"HH-RLHF's train.jsonl(.gz)"
                )
        try:
            chosen, rejected = parse_hh_dialogue(rec["chosen"]), parse_hh_dialogue(rec["rejected"])
        except ValueError:
            skipped += 1
            continue
        if chosen == rejected or chosen[:-1] != rejected[:-1] or any(not m["content"] for m in chosen + rejected):
            skipped += 1  # identical answers, different prompts or empty turns teach nothing
            continue
        write(json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n")
        kept += 1
    return kept, skipped


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows tools) is dropped
        yield from f


def fetch(name: str, output: Path | None = None, source: Path | None = None, log=print) -> Path:
    """Download (or take ``source``) and convert corpus ``name``; returns the written file."""
    if name not in CORPORA:
        raise MiniLLMError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    out = Path(output or corpus.output)
    if out.is_dir():
        raise DataError(f"--output {out} is a directory; give a file path, e.g. {out / Path(corpus.output).name}")
    if source is not None:
        _check_source(Path(source))
        if corpus.convert == "copy":
            _check_sample(Path(source), corpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            raw = Path(tmp) / Path(corpus.url).name
            log(f"downloading {corpus.url}")
            try:
                with urllib.request.urlopen(corpus.url, timeout=60) as resp, open(raw, "wb") as f:
                    shutil.copyfileobj(resp, f)
            except OSError as e:
                raise MiniLLMError(
                    f"could not download {corpus.url} ({e}); fetch it by hand and run "
                    f"`minillm download {name} --from PATH`"
                ) from None
        else:
            raw = Path(source)
        partial = out.with_suffix(out.suffix + ".partial")
        try:
            if corpus.convert == "hh":
                kept, skipped = _convert_hh_file(raw, partial)
                log(f"converted {kept} pairs ({skipped} skipped: unparsable, identical or different prompts)")
            else:
                shutil.copyfile(raw, partial)
        except BaseException:
            partial.unlink(missing_ok=True)  # never leave half a conversion behind
            raise
        os.replace(partial, out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def _convert_hh_file(raw: Path, out: Path) -> tuple[int, int]:
    """Convert the HH-RLHF file ``raw`` into ``out``; (pairs kept, pairs skipped). Bad input is one DataError."""
    try:
        with open(out, "w", encoding="utf-8") as f:
            kept, skipped = convert_hh(_open_text(raw), f.write, str(raw))
    except UnicodeDecodeError as e:
        raise DataError(f"{raw}: not valid UTF-8 ({e.reason}); expected HH-RLHF's train.jsonl(.gz)") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{raw}: not a complete gzip file ({e}); download it again") from None
    if not kept:
        raise DataError(f"{raw}: no usable HH-RLHF pair ({skipped} skipped); expected HH-RLHF's train.jsonl(.gz)")
    return kept, skipped


def _check_source(path: Path) -> None:
    """``--from``: an existing, non-empty file."""
    if path.is_dir():
        raise DataError(f"--from {path} is a directory; give the downloaded file itself")
    if not path.is_file():
        raise DataError(f"--from {path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"--from {path} is empty (0 bytes); download it again")


SAMPLE_BYTES = 1 << 20
SAMPLE_RECORDS = 5


def _check_sample(path: Path, corpus: Corpus) -> None:
    """``--from`` of a copied corpus: its start is UTF-8 text and, for JSON(L) corpora, its first records are objects
    with the corpus's fields. Only the first MB is read: the corpora run to gigabytes."""
    with open(path, "rb") as f:
        head = f.read(SAMPLE_BYTES)
        whole = not f.read(1)

    def bad(lineno: int, problem: str) -> NoReturn:
        raise DataError(f"--from {path}:{lineno}: {problem}; expected {corpus.about}")

    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=whole)
    except UnicodeDecodeError as e:
        bad(head.count(b"\n", 0, e.start) + 1, f"not valid UTF-8 ({e.reason} at byte {e.start})")
    records: list[tuple[int, Any]] = []
    if corpus.fields and corpus.output.endswith(".jsonl"):
        lines = text.split("\n") if whole else text.split("\n")[:-1]  # the last line of a sample may be cut
        for lineno, line in ((n, line) for n, line in enumerate(lines, 1) if line.strip()):
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                bad(lineno, f"not a JSON line ({e.msg})")
            if len(records) == SAMPLE_RECORDS:
                break
    elif corpus.fields:  # a JSON array: its first items
        decoder, at = json.JSONDecoder(), len(text) - len(text.lstrip())
        if not text.startswith("[", at):
            bad(text.count("\n", 0, at) + 1, "not a JSON array of records")
        at += 1
        while len(records) < SAMPLE_RECORDS:
            at = len(text) - len(text[at:].lstrip())
            if at == len(text) or text[at] == "]":
                break
            try:
                item, end = decoder.raw_decode(text, at)
            except json.JSONDecodeError as e:
                if not whole and records:
                    break  # the sample may end inside this item
                bad(e.lineno, f"invalid JSON ({e.msg})")
            records.append((text.count("\n", 0, at) + 1, item))
            at = len(text) - len(text[end:].lstrip())
            at += text.startswith(",", at)
    for lineno, rec in records:
        if not isinstance(rec, dict):
            bad(lineno, f"a record is {type_name(rec)}, not a JSON object")
        for key, kind in corpus.fields:
            if not isinstance(rec.get(key), kind):
                bad(lineno, f"field {key!r} is {field_state(rec, key)}, not {KIND_NAMES[kind]}")


def download_main(argv: list[str]) -> None:
    listing = "\n".join(f"  {k:18s} {v.about}\n  {'':18s} -> {v.output}" for k, v in CORPORA.items())
    parser = CommandParser(
        prog="minillm download",
        description=f"Fetch a public corpus into data/ in a format minillm reads.\n\ncorpora:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(CORPORA), help="which corpus")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write (default: the corpus's path after -> in the list above)",
    )
    parser.add_argument("--from", dest="source", type=Path, default=None, help="convert a local copy, no network")
    args = parser.parse_args(argv)
    fetch(args.name, args.output, args.source)


if __name__ == "__main__":
    download_main(sys.argv[1:])
