"""Log-likelihoods and rolling-window perplexity from a model, the metrics, and running tasks end to end."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm_lightning.errors import MiniLLMError
from minillm_lightning.eval.tasks import TASKS, ChoiceDoc, TaskKind, TaskSpec, ensure_files, load_task, load_text_file
from minillm_lightning.model import MiniGPT
from minillm_lightning.tokenizer import Tokenizer

# ---------------------------------------------------------------- scoring with the model


class LogLikelihoodScorer:
    """Token log-likelihoods from a causal LM, in right-padded batches (padding after a sequence never changes
    what a causal model predicts inside it).

    Speed matters (WikiText-2 is ~300k tokens, fed twice at the default stride): every request is turned into
    rows of one padded id tensor and a mask of the positions to score, built with tensor operations per document
    rather than Python work per window; windows of all documents share batches; a MiniGPT runs its output head only
    on the scored positions (half of each rolling window at the default stride); the answers of a multiple-choice
    question share one copy of its context; the argmax is computed only for tasks that report greedy accuracy.

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

    def _nll_at(
        self, ids: Tensor, flat_pos: Tensor, target: Tensor, greedy: bool, **packed: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """NLL (M,) of ``target`` at ``flat_pos`` (indices into the flattened (B, T) predictions), and whether each
        target is the argmax when ``greedy``. ``packed``: ``position_ids`` and ``attn_mask`` for a MiniGPT.

        A MiniGPT runs its output head only on those positions. Logits go through the head and the loss in chunks
        of about 4M values, which stay in the CPU cache between the matmul and the softmax: 1.5-2x faster than one
        (M, V) pass at a 6k vocabulary.
        """
        if isinstance(self.model, MiniGPT):
            hidden = self.model(ids, compute_logits=False, **packed).hidden
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
        ``greedy=False`` the argmax is skipped and the second value is always False. A MiniGPT feeds the context
        of consecutive requests that share it once (:meth:`_loglikelihood_shared`).
        """
        if isinstance(self.model, MiniGPT):
            return self._loglikelihood_shared(requests, greedy)
        return self._loglikelihood_rows(requests, greedy)

    def _loglikelihood_rows(
        self, requests: Sequence[tuple[list[int], list[int]]], greedy: bool
    ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` with one row (context + continuation) per request."""
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

    @torch.inference_mode()
    def _loglikelihood_shared(
        self, requests: Sequence[tuple[list[int], list[int]]], greedy: bool
    ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` with the continuations of consecutive requests that share a context packed into
        one row after a single copy of the context (multiple choice: 2-4 answers to one question).

        Each continuation gets the positions it would have after the context alone (RoPE) and an attention mask
        that shows it the context and its own earlier tokens only, so every prediction is the one of its own
        ``context + continuation`` row, in fewer fed tokens (``tests/test_eval_scoring.py``). A request whose
        context and continuation exceed ``block_size`` tokens goes through :meth:`_loglikelihood_rows`.
        """
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: list[tuple[list[int], list[int]]] = []  # (context, request indices)
        lengths: list[int] = []  # tokens of each group's packed row
        long = []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont or len(ctx) + len(cont) > self.block_size:
                long.append(i)
            elif groups and groups[-1][0] == ctx and lengths[-1] + len(cont) <= 2 * self.block_size:
                groups[-1][1].append(i)
                lengths[-1] += len(cont)
            else:
                groups.append((ctx, [i]))
                lengths.append(len(ctx) + len(cont))
        if long:
            for i, res in zip(long, self._loglikelihood_rows([requests[i] for i in long], greedy)):
                out[i] = res
        order = sorted(range(len(groups)), key=lambda g: -lengths[g])
        device = self.device
        for b in range(0, len(order), self.batch_size):
            sel = [groups[g] for g in order[b : b + self.batch_size]]
            width = lengths[order[b]]  # longest first
            ids = torch.full((len(sel), width), self.tokenizer.pad_id, dtype=torch.long)
            pos = torch.zeros_like(ids)
            seg = torch.full_like(ids, -1)  # 0: the context, k: continuation k, -1: padding
            flat_pos, target, owner = [], [], []  # owner: the request's place in `members`
            members: list[int] = []
            for r, (ctx, js) in enumerate(sel):
                c = start = len(ctx)
                ids[r, :c], pos[r, :c], seg[r, :c] = torch.tensor(ctx), torch.arange(c), 0
                for part, j in enumerate(js, 1):
                    cont = requests[j][1]
                    end = start + len(cont)
                    ids[r, start:end], pos[r, start:end], seg[r, start:end] = torch.tensor(cont), c, part
                    pos[r, start:end] += torch.arange(len(cont))  # the positions after the context alone
                    # cont[0] is predicted at the context's last token, cont[t] at cont[t - 1]
                    flat_pos += [r * width + c - 1, *range(r * width + start, r * width + end - 1)]
                    target += cont
                    owner += [len(members)] * len(cont)
                    members.append(j)
                    start = end
            packed: dict[str, Tensor | None] = {"position_ids": pos.to(device), "attn_mask": None}
            if int(seg.max()) > 1:  # several continuations in a row: not plain causal attention
                q, kv = torch.arange(width)[:, None], torch.arange(width)[None, :]
                visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # context or own part
                packed["attn_mask"] = ((kv <= q) & visible | (q == kv)).unsqueeze(1).to(device)  # padding: itself
            nll, hits = self._nll_at(
                ids.to(device),
                torch.tensor(flat_pos, device=device),
                torch.tensor(target, device=device),
                greedy,
                **packed,
            )
            owner_t = torch.tensor(owner)
            ll = torch.zeros(len(members), dtype=torch.float64).index_add_(0, owner_t, -nll.double().cpu())
            miss = None if hits is None else torch.zeros(len(members)).index_add_(0, owner_t, (~hits).float().cpu())
            for m, j in enumerate(members):
                out[j] = (float(ll[m]), bool(miss is not None and miss[m] == 0))
            self.forward_tokens += int((seg >= 0).sum())
            self.scored_tokens += len(target)
        return out  # type: ignore[return-value]

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
