"""Zero-shot evaluation of a MiniGPT on standard benchmarks, scored the way lm-evaluation-harness scores them.

Three kinds of task:

* **perplexity** (WikiText-2, any text file): each document is scored with rolling windows of ``block_size``
  tokens advancing by ``stride``; every token is predicted once, with at least ``block_size - stride`` tokens of
  context once the document is longer than a window. Reported: token perplexity (tokenizer-dependent),
  word perplexity (WikiText only, words of the original tokenized text as in lm-eval) and bits per byte
  ``= total NLL (nats) / ln 2 / UTF-8 bytes``, which compares models with different tokenizers.
* **multiple choice** (HellaSwag, ARC, PIQA, WinoGrande, BoolQ): the log-likelihood of each choice given its
  context; ``acc`` picks the highest sum, ``acc_norm`` the highest sum divided by the choice's UTF-8 byte length
  (lm-eval divides by the character count, identical on these ASCII data sets).
* **LAMBADA**: the last word given the passage; ``acc`` counts passages whose every target token is the greedy
  (argmax) prediction, ``ppl`` is ``exp(-mean log p(last word))``.

Every context starts with ``</s>``, the token that precedes each document in the packed pretraining stream
(lm-eval's models prepend their BOS token the same way). Prompt formats follow lm-eval 0.4 task configs.
The loaders read local copies of the upstream files listed in :data:`DOWNLOADS` and convert them.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm_lightning.errors import DataError, MiniLLMError
from minillm_lightning.model import MiniGPT
from minillm_lightning.tokenizer import Tokenizer

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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


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
    for row in _read_jsonl(data_dir / "lambada" / "lambada_test.jsonl"):
        context, last = row["text"].rsplit(" ", 1)
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
    for row in _read_jsonl(path):
        ctx_a, ctx_b = (row["ctx_a"], row["ctx_b"]) if "ctx_a" in row else _split_hellaswag_ctx(row["ctx"])
        ctx = ctx_a + " " + ctx_b.capitalize()
        query = _hellaswag_preprocess(row["activity_label"] + ": " + ctx)
        docs.append(_choice(query, [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"])))
    return docs


def load_piqa(data_dir: Path) -> list[ChoiceDoc]:
    """PIQA validation: ``Question: {goal}\\nAnswer:``; labels come from ``valid-labels.lst``."""
    d = data_dir / "piqa"
    rows = _read_jsonl(d / "valid.jsonl")
    labels = [int(x) for x in (d / "valid-labels.lst").read_text().split()]
    if len(labels) != len(rows):
        raise DataError(f"{d}: {len(rows)} questions but {len(labels)} labels in valid-labels.lst")
    return [_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y) for r, y in zip(rows, labels)]


_ARC_Q = re.compile(r"question: (.*?)\n\n(Answer1: .*?)\n\nAnswer format", re.S)


def _load_arc(path: Path) -> list[ChoiceDoc]:
    """ARC from instruction-formatted records: question and ``AnswerN: text`` options parsed out."""
    docs = []
    for i, row in enumerate(_read_json(path)):
        m = _ARC_Q.search(row["instruction"])
        if not m:
            raise DataError(f"{path}: record {i}: no question/options in the instruction")
        options = [o.strip() for o in re.split(r"Answer\d+: ", m[2]) if o.strip()]
        gold = int(row["answer"].removeprefix("answer")) - 1
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
    for i, row in enumerate(_read_json(path)):
        m = _WINO.search(row["instruction"])
        if not m or "_" not in m[1]:
            raise DataError(f"{path}: record {i}: no sentence with a blank and two options in the instruction")
        sentence, options = m[1].strip(), [m[2].strip(), m[3].strip()]
        cut = sentence.index("_")
        target = " " + sentence[cut + 1 :].strip()
        gold = int(row["answer"].removeprefix("option")) - 1
        docs.append(ChoiceDoc([sentence[:cut] + o for o in options], [target, target], gold, [1, 1]))
    return docs


def load_boolq(data_dir: Path) -> list[ChoiceDoc]:
    """BoolQ: ``{passage}\\nQuestion: {question}?\\nAnswer:`` then `` no``/`` yes``.

    Only the 32 FewGLUE training items carry their passages; the 3,270 local validation items lack them, so
    this scores those 32 (a smoke test, not a benchmark number).
    """
    rows = _read_jsonl(data_dir / "boolq" / "boolq_train32.jsonl")
    return [
        _choice(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["label"])) for r in rows
    ]


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


# ---------------------------------------------------------------- scoring with the model


class LogLikelihoodScorer:
    """Token log-likelihoods from a causal LM, in right-padded batches (padding after a sequence never changes
    what a causal model predicts inside it).

    Speed matters (WikiText-2 is ~300k tokens, fed twice at the default stride): every request is turned into
    rows of one padded id tensor and a mask of the positions to score, built with tensor operations per document
    rather than Python work per window; windows of all documents share batches; a MiniGPT runs its output head only
    on the scored positions (half of each rolling window at the default stride); the argmax is computed only for
    tasks that report greedy accuracy.

    Args:
        model: a MiniGPT, or any module with ``config.block_size`` whose ``forward(idx)`` returns an object with
            ``.logits`` of shape (B, T, V).
        tokenizer: the model's tokenizer (``pad_id`` and ``eos_id`` are used here).
        batch_size: sequences per forward pass.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.block_size = int(model.config.block_size)
        self.forward_tokens = 0
        """Tokens fed through the model so far (padding excluded)."""
        self.scored_tokens = 0
        """Predictions scored so far."""
        self.chunk_values = 1 << 22
        """Logits computed at a time (rows of the output head x vocabulary)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the continuation's
        tokens are those of the whole text after the context's; the context gets the leading ``</s>``."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else self.tokenizer.encode(continuation)
        return [self.tokenizer.eos_id, *ctx], cont or self.tokenizer.encode(continuation)

    def _nll_at(self, ids: Tensor, flat_pos: Tensor, target: Tensor, greedy: bool) -> tuple[Tensor, Tensor | None]:
        """NLL (M,) of ``target`` at ``flat_pos`` (indices into the flattened (B, T) predictions), and whether each
        target is the argmax when ``greedy``.

        A MiniGPT runs its output head only on those positions. Logits go through the head and the loss in chunks
        of about 4M values, which stay in the CPU cache between the matmul and the softmax: 1.5-2x faster than one
        (M, V) pass at a 6k vocabulary.
        """
        if isinstance(self.model, MiniGPT):
            hidden = self.model(ids, compute_logits=False).hidden
            rows, head = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_pos), self.model.lm_head
        else:
            logits = self.model(ids).logits
            rows, head = logits.reshape(-1, logits.shape[-1]).index_select(0, flat_pos), None
        vocab = head.out_features if head is not None else rows.shape[-1]
        chunk = max(1, self.chunk_values // vocab)
        nll, hits = [], []
        for i in range(0, len(rows), chunk):
            logits = (head(rows[i : i + chunk]) if head is not None else rows[i : i + chunk]).float()
            nll.append(F.cross_entropy(logits, target[i : i + chunk], reduction="none"))
            if greedy:
                hits.append(logits.argmax(-1) == target[i : i + chunk])
        empty = rows.new_zeros(0)
        return torch.cat(nll) if nll else empty, (torch.cat(hits) if hits else empty.bool()) if greedy else None

    @torch.inference_mode()
    def score_rows(
        self, rows: Tensor, first: Tensor, last: Tensor, greedy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Score predictions ``first[r] <= t < last[r]`` of every row (prediction t: token t+1 given 0..t).

        Args:
            rows: (R, W) token ids, right-padded; a row is fed up to its ``last`` prediction.
            first, last: (R,) scored range of each row.
            greedy: also say whether each scored token is the argmax prediction.

        Returns:
            The NLL (nats, float64) of every scored prediction, row after row, and with ``greedy`` the matching
            booleans (else None). Rows are batched longest first, ``batch_size`` at a time.
        """
        order = torch.argsort(last, descending=True, stable=True)
        nll = torch.empty(int((last - first).sum()), dtype=torch.float64)
        hits = torch.empty(nll.shape, dtype=torch.bool) if greedy else None
        offsets = torch.cumsum(last - first, 0) - (last - first)  # where each row's scores start in the output
        device = self.device
        for b in range(0, len(order), self.batch_size):
            sel = order[b : b + self.batch_size]
            width = int(last[sel[0]])
            if width > self.block_size:
                raise ValueError(f"sequence of {width + 1} tokens exceeds block_size + 1 = {self.block_size + 1}")
            ids = rows[sel, : width + 1]
            pos = torch.arange(width)
            keep = (pos >= first[sel, None]) & (pos < last[sel, None])  # (B, width) scored predictions
            flat_pos = keep.reshape(-1).nonzero().squeeze(1)
            target = ids[:, 1:].reshape(-1)[flat_pos].to(device)
            batch_nll, batch_hits = self._nll_at(ids[:, :-1].to(device), flat_pos.to(device), target, greedy)
            # where these scores go: each row's block of the output, in row order (keep is row-major)
            dest = (offsets[sel, None] + (pos - first[sel, None]))[keep]
            nll[dest] = batch_nll.double().cpu()
            if hits is not None:
                hits[dest] = batch_hits.cpu()
            self.forward_tokens += int(last[sel].sum())
        self.scored_tokens += len(nll)
        return nll, hits

    def loglikelihood(
        self, requests: Sequence[tuple[list[int], list[int]]], greedy: bool = True
    ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), all continuation tokens greedy) per (context ids, continuation ids).

        A pair longer than the context window keeps its last ``block_size + 1`` tokens, as lm-eval does. With
        ``greedy=False`` the argmax is skipped and the second value is always False.
        """
        seqs = [(ctx + cont)[-(self.block_size + 1) :] for ctx, cont in requests]
        if not seqs:
            return []
        width = max(len(s) for s in seqs)
        rows = torch.tensor([s + [self.tokenizer.pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in seqs])
        first = last - torch.tensor([min(len(c), len(s) - 1) for (_, c), s in zip(requests, seqs)])
        nll, hits = self.score_rows(rows, first, last, greedy)
        row_of = torch.repeat_interleave(torch.arange(len(seqs)), last - first)
        ll = torch.zeros(len(seqs), dtype=torch.float64).index_add_(0, row_of, -nll)
        if hits is None:
            return [(float(x), False) for x in ll]
        misses = torch.zeros(len(seqs), dtype=torch.long).index_add_(0, row_of, (~hits).long())
        return [(float(x), not int(m)) for x, m in zip(ll, misses)]

    def rolling_nll(self, docs: Sequence[Sequence[int]], stride: int | None = None) -> list[tuple[float, int]]:
        """(total NLL in nats, tokens scored) of each document (ids including the leading ``</s>``, not scored).

        Windows of ``block_size`` predictions advance by ``stride`` (default ``block_size // 2``; ``block_size``
        feeds every token once, twice as fast but with less context for the first tokens of each window); each
        scores only the predictions not scored by the previous window, so every token counts once. The windows of
        all documents are cut with tensor operations and scored together in batches.
        """
        stride = stride or self.block_size // 2
        if not 0 < stride <= self.block_size:
            raise ValueError(f"stride must be in 1..block_size={self.block_size}, got {stride}")
        parts, firsts, lasts, doc_of = [], [], [], []
        for d, ids in enumerate(docs):
            toks = torch.as_tensor(list(ids), dtype=torch.long)
            n = len(toks) - 1  # predictions
            if n < 1:
                continue
            w = min(n, self.block_size)  # inputs per window (fewer only for a document shorter than a window)
            k = 1 + max(0, -(-(n - w) // stride))  # windows
            ends = torch.clamp(w + stride * torch.arange(k), max=n)
            starts = ends - w
            prevs = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
            parts.append(toks[starts[:, None] + torch.arange(w + 1)])  # (k, w + 1) one gather per document
            firsts.append(prevs - starts)
            lasts.append(torch.full((k,), w))
            doc_of.append(torch.full((k,), d))
        totals = [(0.0, 0)] * len(docs)
        if not parts:
            return totals
        width = max(p.shape[1] for p in parts)
        rows = torch.full((sum(len(p) for p in parts), width), self.tokenizer.pad_id, dtype=torch.long)
        r = 0
        for p in parts:
            rows[r : r + len(p), : p.shape[1]] = p
            r += len(p)
        first, last, doc = torch.cat(firsts), torch.cat(lasts), torch.cat(doc_of)
        nll, _ = self.score_rows(rows, first, last)
        doc_per_score = torch.repeat_interleave(doc, last - first)
        sums = torch.zeros(len(docs), dtype=torch.float64).index_add_(0, doc_per_score, nll)
        counts = torch.bincount(doc_per_score, minlength=len(docs))
        return [(float(s), int(c)) for s, c in zip(sums, counts)]


def rolling_windows(n_predictions: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, prev_end)`` over predictions ``0..n-1`` (prediction j is token j+1 given tokens
    0..j): a window feeds tokens ``start..end-1`` and keeps predictions ``prev_end..end-1``."""
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size={block_size}, got {stride}")
    out, prev = [], 0
    end = min(block_size, n_predictions)
    while True:
        out.append((max(0, end - block_size), end, prev))
        if end >= n_predictions:
            return out
        prev, end = end, min(end + stride, n_predictions)


# ---------------------------------------------------------------- metrics


def stderr_of_mean(values: Sequence[float]) -> float:
    """Sample standard error of a mean (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def choice_metrics(docs: Sequence[ChoiceDoc], lls: Sequence[Sequence[float]], acc_norm: bool) -> dict[str, float]:
    """acc (argmax of log-likelihoods) and optionally acc_norm (argmax of log-likelihood per byte) with stderr."""
    hits = [float(max(range(len(ll)), key=ll.__getitem__) == doc.gold) for doc, ll in zip(docs, lls)]
    out = {"acc": sum(hits) / len(hits), "acc_stderr": stderr_of_mean(hits)}
    if acc_norm:
        lengths = [doc.norm_lengths or [len(c.strip().encode("utf-8")) for c in doc.continuations] for doc in docs]
        normed = [[v / max(1, n) for v, n in zip(ll, ns)] for ns, ll in zip(lengths, lls)]
        hits = [float(max(range(len(ll)), key=ll.__getitem__) == doc.gold) for doc, ll in zip(docs, normed)]
        out |= {"acc_norm": sum(hits) / len(hits), "acc_norm_stderr": stderr_of_mean(hits)}
    return out


def perplexity_metrics(nll: float, tokens: int, n_bytes: int, words: int = 0) -> dict[str, float]:
    """Token perplexity, bits per byte (``nll / ln 2 / bytes``), byte perplexity and, given words, word perplexity."""
    out = {
        "token_perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "byte_perplexity": math.exp(nll / n_bytes),
    }
    if words:
        out["word_perplexity"] = math.exp(nll / words)
    return out | {"tokens": tokens, "bytes": n_bytes, **({"words": words} if words else {})}


# ---------------------------------------------------------------- running tasks


def evaluate_docs(
    scorer: LogLikelihoodScorer, kind: TaskKind, docs: Sequence[Any], acc_norm: bool = False, stride: int | None = None
) -> dict[str, float]:
    """Score loaded documents of one task kind and return its metrics (plus ``n``, the number of documents)."""
    if not docs:
        raise MiniLLMError("no documents to evaluate")
    tok = scorer.tokenizer
    if kind == "perplexity":
        ids = [[tok.eos_id, *tok.encode(d.text)] for d in docs]
        scored = scorer.rolling_nll(ids, stride)
        nll, tokens = sum(s[0] for s in scored), sum(s[1] for s in scored)
        n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
        words = sum(d.words for d in docs) if all(d.words for d in docs) else 0
        return perplexity_metrics(nll, tokens, n_bytes, words) | {"n": len(docs)}
    if kind == "lambada":
        res = scorer.loglikelihood([scorer.encode_pair(d.context, d.target) for d in docs])
        hits = [float(g) for _, g in res]
        lls = [ll for ll, _ in res]
        return {
            "acc": sum(hits) / len(hits),
            "acc_stderr": stderr_of_mean(hits),
            "ppl": math.exp(-sum(lls) / len(lls)),
            "n": len(docs),
        }
    requests = [scorer.encode_pair(c, t) for d in docs for c, t in zip(d.contexts, d.continuations)]
    flat = iter(ll for ll, _ in scorer.loglikelihood(requests, greedy=False))  # accuracy needs no argmax
    lls = [[next(flat) for _ in d.contexts] for d in docs]
    return choice_metrics(docs, lls, acc_norm) | {"n": len(docs)}


def run_tasks(
    scorer: LogLikelihoodScorer,
    tasks: Iterable[str],
    data_dir: Path,
    limit: int | None = None,
    download: bool = True,
    stride: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Evaluate built-in tasks (names from :data:`TASKS`) or ``text:PATH`` perplexity tasks; ``limit`` keeps the
    first N documents of each. Returns ``{task: metrics}``."""
    results: dict[str, dict[str, Any]] = {}
    for name in tasks:
        t0 = time.perf_counter()
        if name.startswith("text:"):
            spec, docs = TaskSpec("perplexity", load_text_file, ()), load_text_file(Path(name[5:]))
        else:
            if name not in TASKS:
                raise MiniLLMError(f"unknown task {name!r}; choose from {', '.join(TASKS)} or text:PATH")
            spec = TASKS[name]
            ensure_files(name, data_dir, download)
            docs = load_task(name, data_dir)
        total = len(docs)
        docs = docs[:limit] if limit else docs
        fed, scored, t_score = scorer.forward_tokens, scorer.scored_tokens, time.perf_counter()
        metrics = evaluate_docs(scorer, spec.kind, docs, spec.acc_norm, stride)
        t_score = time.perf_counter() - t_score  # scoring only: loading and tokenizing excluded
        metrics |= {
            "n_total": total,
            "seconds": round(time.perf_counter() - t0, 2),
            "scored_tokens": scorer.scored_tokens - scored,
            "scored_tokens_per_sec": round((scorer.scored_tokens - scored) / max(t_score, 1e-9), 1),
            "forward_tokens_per_sec": round((scorer.forward_tokens - fed) / max(t_score, 1e-9), 1),
        }
        if spec.chance is not None:
            metrics["chance"] = spec.chance
        if spec.note:
            metrics["note"] = spec.note
        results[name] = metrics
        log(
            f"{name}: {format_metrics(metrics)} ({metrics['n']} docs, {metrics['seconds']:.1f}s, "
            f"{metrics['scored_tokens_per_sec']:,.0f} scored tokens/s)"
        )
    return results


_SHOWN = ("acc", "acc_norm", "ppl", "bits_per_byte", "word_perplexity", "token_perplexity", "byte_perplexity")


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in _SHOWN if k in metrics)


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per task and metric, with stderr, documents scored and chance level."""
    lines = ["| task | metric | value | ± stderr | n | chance |", "|---|---|---:|---:|---:|---:|"]
    for task, m in results.items():
        n = f"{m['n']}" if m["n"] == m.get("n_total", m["n"]) else f"{m['n']}/{m['n_total']}"
        for key in _SHOWN:
            if key in m:
                err = m.get(f"{key}_stderr")
                err_s = f"{err:.4f}" if isinstance(err, float) and not math.isnan(err) else ""
                chance = f"{m['chance']:.3f}" if key.startswith("acc") and "chance" in m else ""
                value = f"{m[key]:.4f}" if abs(m[key]) < 1e5 else f"{m[key]:.3e}"
                lines.append(f"| {task} | {key} | {value} | {err_s} | {n} | {chance} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- optional lm-evaluation-harness adapter


def harness_lm(scorer: LogLikelihoodScorer, max_gen_tokens: int = 256) -> Any:
    """An ``lm_eval.api.model.LM`` backed by ``scorer`` (needs ``pip install 'lm_eval>=0.4,<0.5'``).

    Contexts start with ``</s>`` like the built-in tasks; ``generate_until`` decodes greedily with the KV cache
    and cuts at the first stop string.
    """
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise MiniLLMError("--harness needs lm-evaluation-harness: pip install 'lm_eval>=0.4,<0.5'") from None
    from minillm_lightning.generation import GenerationConfig, TextGenerator

    class MiniLLMHarnessLM(LM):
        """lm-eval model interface over a MiniGPT: loglikelihood, loglikelihood_rolling, generate_until."""

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return scorer.loglikelihood([scorer.encode_pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            eos = scorer.tokenizer.eos_id
            docs = [[eos, *scorer.tokenizer.encode(r.args[0])] for r in requests]
            return [-nll for nll, _ in scorer.rolling_nll(docs)]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            gen = TextGenerator(scorer.model, scorer.tokenizer)
            outputs = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                ids = [scorer.tokenizer.eos_id, *scorer.tokenizer.encode(context)]
                budget = min(int(kwargs.get("max_gen_toks", max_gen_tokens)), scorer.block_size - 1)
                ids = ids[-(scorer.block_size - budget) :]
                new = gen.generate([ids], GenerationConfig(max_new_tokens=budget, temperature=0.0))[0]
                text = scorer.tokenizer.decode([t for t in new if t not in gen.stop_tokens])
                for stop in until:
                    text = text.split(stop)[0]
                outputs.append(text)
            return outputs

    return MiniLLMHarnessLM()
