"""The evaluation tasks: their documents, the loaders of the local files, and where missing files come from."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minillm_lightning.errors import KIND_NAMES, DataError, MiniLLMError, field_state, type_name

TaskKind = Literal["perplexity", "choice", "lambada"]


# ---------------------------------------------------------------- documents


@dataclass
class TextDoc:
    """A document scored as a whole (perplexity tasks)."""

    text: str
    words: int = 0
    """Word count for word perplexity (0: not reported)."""


@dataclass
class ChoiceDoc:
    """One multiple-choice item: ``contexts[i] + continuations[i]`` is choice ``i``.

    Standard tasks repeat the context; WinoGrande's partial scoring repeats the continuation instead.
    """

    contexts: list[str]
    continuations: list[str]
    gold: int
    norm_lengths: list[int] = field(default_factory=list)
    """Lengths for acc_norm (UTF-8 bytes of each choice without the leading space)."""


@dataclass
class LambadaDoc:
    context: str
    target: str


# ---------------------------------------------------------------- loaders of the local files


class _BadRecord(Exception):
    """A record of a task file that is not in the expected format: where (file:line), what is wrong and, as ``tag``,
    the kind of error (e.g. "KeyError: 'text'"); :func:`load_task` makes it a one-line DataError."""

    def __init__(self, where: str, problem: str, tag: str) -> None:
        super().__init__(f"{where} is not in the expected format ({tag}): {problem}")


def _field(where: str, row: Any, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]`` when ``row`` is an object whose field ``key`` is a ``kind``; else a :class:`_BadRecord`."""
    if not isinstance(row, dict):
        raise _BadRecord(where, f"the record is {type_name(row)}, not a JSON object", "TypeError")
    if key not in row:
        raise _BadRecord(where, f"field {key!r} is missing", f"KeyError: {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        expected = " or ".join(KIND_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _BadRecord(where, f"field {key!r} is {field_state(row, key)}, not {expected}", "TypeError")
    return value


def _strings(where: str, row: Any, key: str) -> list[str]:
    """Field ``key`` of ``row``: a list of strings."""
    value = _field(where, row, key, list)
    if not all(isinstance(v, str) for v in value):
        raise _BadRecord(where, f"field {key!r} is not a list of strings", "TypeError")
    return value


def _number(where: str, row: Any, key: str, prefix: str = "") -> int:
    """Field ``key`` of ``row`` as an integer: a JSON number or a string of digits after ``prefix``."""
    value = _field(where, row, key, (int, str))
    try:
        return int(value.removeprefix(prefix) if isinstance(value, str) else value)
    except ValueError:
        expected = f"{prefix}<number>" if prefix else "a number"
        raise _BadRecord(where, f"field {key!r} is {value!r}, not {expected}", "ValueError") from None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(``file:line``, record) of the lines of a JSONL file (a UTF-8 byte-order mark is dropped)."""
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    """(``file record N``, record) of the array a JSON file holds (a UTF-8 byte-order mark is dropped)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type_name(data)}")
    return [(f"{path} record {i}", row) for i, row in enumerate(data, 1)]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (``@-@``, spaces before punctuation); lm-eval's ``wikitext_detokenizer``."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        s = s.replace(a, b)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):
        s = s.replace(a, b)
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def load_wikitext2(data_dir: Path) -> list[TextDoc]:
    """The 62 articles of the WikiText-2 raw test set, detokenized; words counted on the original text.

    The local ``wiki.test.raw`` is a dump without the blank lines (and with CRLF); its lines align one to one with
    the non-blank lines of ``wiki.test.tokens``, whose layout restores the original file. Articles start at
    level-1 headings (`` = Title = ``), as in lm-eval's ``wikitext_document_level``.
    """
    d = data_dir / "wikitext2"
    raw = (d / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    raw = raw[:-1] if raw and raw[-1] == "" else raw
    if "" not in raw and not any(line == " " for line in raw):  # blank lines removed: restore them
        layout = (d / "wiki.test.tokens").read_text(encoding="utf-8").split("\n")[:-1]
        it = iter(raw)
        raw = [line if not line.strip() else next(it) for line in layout]
    pages: list[list[str]] = []
    for line in raw:
        if not pages and not line.strip():
            continue  # the blank line opening the file
        heading = re.match(r"^ = [^=].* = $", line)
        if not pages or heading and any(x.strip() for x in pages[-1]):
            pages.append([])
        pages[-1].append(line + "\n")
    docs = []
    for lines in pages:
        page = "".join(lines)
        docs.append(TextDoc(wikitext_detokenize(page), words=len(page.split())))
    return docs


def load_text_file(path: Path) -> list[TextDoc]:
    """Any UTF-8 text file as one document (no word perplexity: "words" depend on the language)."""
    return [TextDoc(path.read_text(encoding="utf-8"))]


def load_lambada(data_dir: Path) -> list[LambadaDoc]:
    """LAMBADA (OpenAI): the passage without its last word, and ``" " + last word``."""
    docs = []
    for where, row in _read_jsonl(data_dir / "lambada" / "lambada_test.jsonl"):
        text = _field(where, row, "text")
        if " " not in text:
            raise _BadRecord(where, "field 'text' has no space before a last word", "ValueError")
        context, last = text.rsplit(" ", 1)
        docs.append(LambadaDoc(context, " " + last))
    return docs


def _choice(context: str, choices: Sequence[str], gold: int) -> ChoiceDoc:
    """A standard item: the same context, each choice after a space (lm-eval's ``target_delimiter``)."""
    return ChoiceDoc(
        [context] * len(choices), [" " + c for c in choices], gold, [len(c.encode("utf-8")) for c in choices]
    )


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) from a merged ``ctx``: ctx_b is the trailing lower-case fragment after the last sentence.

    The local copy lacks the two fields; in ActivityNet items (all of the first 1,000) ctx_b is that fragment.
    """
    head, sep, tail = ctx.rpartition(". ")
    if tail[:1].islower():
        return (head + sep).rstrip(), tail
    return ctx, ""


def load_hellaswag(data_dir: Path) -> list[ChoiceDoc]:
    """HellaSwag validation: ``activity_label: ctx_a + ' ' + ctx_b.capitalize()`` then each ending."""
    d = data_dir / "hellaswag"
    path = d / "hellaswag_val_1000.jsonl" if (d / "hellaswag_val_1000.jsonl").is_file() else d / "hellaswag_val.jsonl"
    docs = []
    for w, row in _read_jsonl(path):
        if isinstance(row, dict) and "ctx_a" in row:
            ctx_a, ctx_b = _field(w, row, "ctx_a"), _field(w, row, "ctx_b")
        else:
            ctx_a, ctx_b = _split_hellaswag_ctx(_field(w, row, "ctx"))
        ctx = ctx_a + " " + ctx_b.capitalize()
        query = _hellaswag_preprocess(_field(w, row, "activity_label") + ": " + ctx)
        endings = [_hellaswag_preprocess(e) for e in _strings(w, row, "endings")]
        docs.append(_choice(query, endings, _number(w, row, "label")))
    return docs


def load_piqa(data_dir: Path) -> list[ChoiceDoc]:
    """PIQA validation: ``Question: {goal}\\nAnswer:``; labels come from ``valid-labels.lst``."""
    d = data_dir / "piqa"
    rows = _read_jsonl(d / "valid.jsonl")
    labels = [int(x) for x in (d / "valid-labels.lst").read_text().split()]
    if len(labels) != len(rows):
        raise DataError(f"{d}: {len(rows)} questions but {len(labels)} labels in valid-labels.lst")
    return [
        _choice(f"Question: {_field(w, r, 'goal')}\nAnswer:", [_field(w, r, "sol1"), _field(w, r, "sol2")], y)
        for (w, r), y in zip(rows, labels)
    ]


_ARC_Q = re.compile(r"question: (.*?)\n\n(Answer1: .*?)\n\nAnswer format", re.S)


def _load_arc(path: Path) -> list[ChoiceDoc]:
    """ARC from instruction-formatted records: question and ``AnswerN: text`` options parsed out."""
    docs = []
    for where, row in _read_json(path):
        m = _ARC_Q.search(_field(where, row, "instruction"))
        if not m:
            raise _BadRecord(where, "field 'instruction' holds no question and options", "ValueError")
        options = [o.strip() for o in re.split(r"Answer\d+: ", m[2]) if o.strip()]
        gold = _number(where, row, "answer", "answer") - 1
        docs.append(_choice(f"Question: {m[1].strip()}\nAnswer:", options, gold))
    return docs


def load_arc_easy(data_dir: Path) -> list[ChoiceDoc]:
    return _load_arc(data_dir / "arc" / "arc_easy_test.json")


def load_arc_challenge(data_dir: Path) -> list[ChoiceDoc]:
    return _load_arc(data_dir / "arc" / "arc_challenge_test.json")


_WINO = re.compile(r"sentence: (.*?)\n\nOption1: (.*) Option2: (.*) Answer format", re.S)


def load_winogrande(data_dir: Path) -> list[ChoiceDoc]:
    """WinoGrande dev, partial scoring: the text after the blank given each option-filled prefix."""
    path = data_dir / "winogrande" / "winogrande_dev.json"
    docs = []
    for where, row in _read_json(path):
        m = _WINO.search(_field(where, row, "instruction"))
        if not m or "_" not in m[1]:
            problem = "field 'instruction' holds no sentence with a blank and two options"
            raise _BadRecord(where, problem, "ValueError")
        sentence, options = m[1].strip(), [m[2].strip(), m[3].strip()]
        cut = sentence.index("_")
        target = " " + sentence[cut + 1 :].strip()
        gold = _number(where, row, "answer", "option") - 1
        docs.append(ChoiceDoc([sentence[:cut] + o for o in options], [target, target], gold, [1, 1]))
    return docs


def load_boolq(data_dir: Path) -> list[ChoiceDoc]:
    """BoolQ: ``{passage}\\nQuestion: {question}?\\nAnswer:`` then `` no``/`` yes``.

    Only the 32 FewGLUE training items carry their passages; the 3,270 local validation items lack them, so
    this scores those 32 (a smoke test, not a benchmark number).
    """
    docs = []
    for w, r in _read_jsonl(data_dir / "boolq" / "boolq_train32.jsonl"):
        context = f"{_field(w, r, 'passage')}\nQuestion: {_field(w, r, 'question')}?\nAnswer:"
        docs.append(_choice(context, ["no", "yes"], _number(w, r, "label")))
    return docs


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: how to load it and what to report."""

    kind: TaskKind
    load: Callable[[Path], list[Any]]
    files: tuple[str, ...]
    """Files under the data directory it reads (checked, and downloaded when missing unless told not to)."""
    acc_norm: bool = False
    chance: float | None = None
    note: str = ""


TASKS: dict[str, TaskSpec] = {
    "wikitext2": TaskSpec("perplexity", load_wikitext2, ("wikitext2/wiki.test.raw", "wikitext2/wiki.test.tokens")),
    "lambada": TaskSpec("lambada", load_lambada, ("lambada/lambada_test.jsonl",), note="OpenAI detokenized test"),
    "hellaswag": TaskSpec(
        "choice",
        load_hellaswag,
        ("hellaswag/hellaswag_val_1000.jsonl",),
        True,
        0.25,
        "validation (hellaswag_val_1000.jsonl holds the first 1,000)",
    ),
    "arc_easy": TaskSpec("choice", load_arc_easy, ("arc/arc_easy_test.json",), True, 0.25),
    "arc_challenge": TaskSpec("choice", load_arc_challenge, ("arc/arc_challenge_test.json",), True, 0.25),
    "winogrande": TaskSpec("choice", load_winogrande, ("winogrande/winogrande_dev.json",), False, 0.5),
    "piqa": TaskSpec("choice", load_piqa, ("piqa/valid.jsonl", "piqa/valid-labels.lst"), True, 0.5),
    "boolq": TaskSpec(
        "choice",
        load_boolq,
        ("boolq/boolq_train32.jsonl",),
        False,
        18 / 32,
        "32 FewGLUE items with passages (local validation set has none); chance = majority 'yes'",
    ),
}

# where missing files come from (public upstream copies; ``minillm eval`` downloads them into --data-dir)
_GH = "https://raw.githubusercontent.com"
DOWNLOADS: dict[str, str] = {
    "wikitext2/wiki.test.tokens": f"{_GH}/pytorch/examples/main/word_language_model/data/wikitext-2/test.txt",
    "wikitext2/wiki.test.raw": f"{_GH}/Tylogi/TyloQuant/main/data/wikitext-2-raw/wiki.test.raw",
    "lambada/lambada_test.jsonl": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    "hellaswag/hellaswag_val_1000.jsonl": f"{_GH}/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "piqa/valid.jsonl": f"{_GH}/ybisk/ybisk.github.io/master/piqa/data/valid.jsonl",
    "piqa/valid-labels.lst": f"{_GH}/ybisk/ybisk.github.io/master/piqa/data/valid-labels.lst",
    "arc/arc_easy_test.json": f"{_GH}/AGI-Edgerunners/LLM-Adapters/main/dataset/ARC-Easy/test.json",
    "arc/arc_challenge_test.json": f"{_GH}/AGI-Edgerunners/LLM-Adapters/main/dataset/ARC-Challenge/test.json",
    "winogrande/winogrande_dev.json": f"{_GH}/AGI-Edgerunners/LLM-Adapters/main/dataset/winogrande/test.json",
    "boolq/boolq_train32.jsonl": f"{_GH}/timoschick/fewglue/master/FewGLUE/BoolQ/train.jsonl",
}


def ensure_files(task: str, data_dir: Path, download: bool = True) -> None:
    """Check that ``task``'s files exist under ``data_dir``; fetch missing ones unless ``download`` is False.

    The full HellaSwag validation set downloads as ``hellaswag/hellaswag_val.jsonl`` (the loader reads either).
    """
    for rel in TASKS[task].files:
        path = data_dir / rel
        if rel.startswith("hellaswag/") and (path.parent / "hellaswag_val.jsonl").is_file():
            continue
        if path.is_file():
            continue
        if path.is_dir():
            raise DataError(f"task {task}: {path} is a directory, not the task's file; remove or rename it")
        url = DOWNLOADS[rel]
        if not download:
            raise DataError(f"task {task}: {path} is missing (--no-download); fetch it from {url}")
        if rel.startswith("hellaswag/"):
            path = path.parent / "hellaswag_val.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as out:
                out.write(r.read())
        except OSError as e:
            raise DataError(f"task {task}: {path} is missing and downloading {url} failed ({e})") from None
        tmp.replace(path)


def load_task(task: str, data_dir: Path) -> list[Any]:
    """The documents of ``task`` from its files under ``data_dir``; a file of another format is one DataError."""
    files = ", ".join(str(data_dir / f) for f in TASKS[task].files)
    try:
        docs = TASKS[task].load(data_dir)
    except _BadRecord as e:
        raise DataError(f"task {task}: {e}; delete the file so that minillm eval downloads it again") from None
    except MiniLLMError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(
            f"task {task}: {files} is not in the expected format ({type(e).__name__}: {e}); delete it so that "
            f"minillm eval downloads it again"
        ) from None
    if not docs:
        raise DataError(f"task {task}: {files} holds no documents; delete it so that minillm eval downloads it again")
    return docs
