"""The batched scorer of ``minillm eval`` against a straightforward one-window-at-a-time re-implementation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minillm_lightning.eval import scorer as ev_scorer
from minillm_lightning.model import MiniGPT, MiniGPTConfig

TOK = SimpleNamespace(pad_id=0, eos_id=1)


def _model() -> MiniGPT:
    torch.manual_seed(0)
    cfg = MiniGPTConfig(n_layer=2, dim=32, n_head=4, n_kv_head=2, block_size=16, vocab_size=50)
    return MiniGPT(cfg).eval()


class LogitsOnly(nn.Module):
    """A model that is not a MiniGPT (the scorer must compute all logits and pick the scored ones)."""

    def __init__(self, inner: MiniGPT) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, idx: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.inner(idx).logits)


def rolling_windows(n_predictions: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, prev_end)`` over predictions ``0..n-1`` (prediction j is token j+1 given tokens
    0..j): a window feeds tokens ``start..end-1`` and keeps predictions ``prev_end..end-1``. The reference the
    scorer's tensor-cut windows (``LogLikelihoodScorer.rolling_nll``) are checked against, one window at a time."""
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size={block_size}, got {stride}")
    out, prev = [], 0
    end = min(block_size, n_predictions)
    while True:
        out.append((max(0, end - block_size), end, prev))
        if end >= n_predictions:
            return out
        prev, end = end, min(end + stride, n_predictions)


def test_rolling_windows_score_every_prediction_once() -> None:
    for n, block, stride in [(5, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 5), (100, 16, 16), (33, 16, 1)]:
        seen = []
        for start, end, prev in rolling_windows(n, block, stride):
            assert end - start <= block and start <= prev < end
            assert prev - start >= min(block - stride, prev)  # every scored token keeps block - stride context
            seen += range(prev, end)
        assert seen == list(range(n))


def reference_rolling_nll(model: MiniGPT, ids: list[int], block: int, stride: int) -> tuple[float, int]:
    """Each window alone through the model; sum the NLL of the predictions it newly scores."""
    nll, n = 0.0, 0
    for start, end, prev in rolling_windows(len(ids) - 1, block, stride):
        x = torch.tensor([ids[start : end + 1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x[:, :-1]).logits[0].double(), -1)
        lp = logp.gather(-1, x[0, 1:, None]).squeeze(-1)
        nll -= float(lp[prev - start :].sum())
        n += end - prev
    return nll, n


def reference_loglikelihood(model: MiniGPT, context: list[int], cont: list[int]) -> tuple[float, bool]:
    """One request alone: its last block_size + 1 tokens in one forward; (log-likelihood, all greedy)."""
    seq = (context + cont)[-(model.config.block_size + 1) :]
    x = torch.tensor([seq])
    with torch.no_grad():
        logits = model(x[:, :-1]).logits[0].double()
    lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
    n = min(len(cont), len(seq) - 1)
    return float(lp[-n:].sum()), bool((logits.argmax(-1) == x[0, 1:])[-n:].all())


@pytest.mark.parametrize("stride", [1, 5, 8, 16])
@pytest.mark.parametrize("wrap", [False, True])
def test_batched_rolling_nll_equals_window_by_window(stride: int, wrap: bool) -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    lengths = [2, 9, 16, 17, 40, 63, 5]  # shorter than a window, exactly one, one more, several
    docs = [[1, *torch.randint(2, 50, (n - 1,), generator=g).tolist()] for n in lengths]
    scorer = ev_scorer.LogLikelihoodScorer(LogitsOnly(model) if wrap else model, TOK, batch_size=3)
    scorer.chunk_values = 50 * 7  # logits in chunks of 7 rows: chunk edges fall inside windows
    got = scorer.rolling_nll(docs, stride)
    for doc, (nll, n) in zip(docs, got):
        ref_nll, ref_n = reference_rolling_nll(model, doc, 16, stride)
        assert n == ref_n == len(doc) - 1
        assert nll == pytest.approx(ref_nll, rel=1e-5, abs=1e-5)
    assert scorer.scored_tokens == sum(n for _, n in got)


def test_batched_loglikelihood_equals_one_request_at_a_time() -> None:
    model = _model()
    g = torch.Generator().manual_seed(2)
    requests = [
        ([1, *torch.randint(2, 50, (c,), generator=g).tolist()], torch.randint(2, 50, (k,), generator=g).tolist())
        for c, k in [(3, 1), (10, 4), (14, 6), (2, 2), (20, 3)]  # the last is cut to its final 17 tokens
    ]
    # a continuation made of the model's own greedy predictions: "all greedy" must say True for it
    ctx = [1, 5, 7]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    requests.append((ctx, [nxt]))
    scorer = ev_scorer.LogLikelihoodScorer(model, TOK, batch_size=2)
    scorer.chunk_values = 50 * 3
    got = scorer.loglikelihood(requests)
    for (c, k), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = reference_loglikelihood(model, c, k)
        assert ll == pytest.approx(ref_ll, rel=1e-5)
        assert greedy == ref_greedy
    assert got[-1][1] is True
    # without the argmax: the same log-likelihoods
    fast = scorer.loglikelihood(requests, greedy=False)
    assert [ll for ll, _ in fast] == pytest.approx([ll for ll, _ in got], rel=1e-6)


def test_shared_contexts_are_fed_once_and_score_like_separate_rows() -> None:
    """Multiple choice: answers to one question share its context. Packed after one copy of it (own positions, a
    mask that hides the other answers), each answer scores as its own context + answer row does."""
    model = _model()
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(2, 50, (n,), generator=g).tolist()

    requests = []
    # (8, ...): a packed row of 24 tokens, longer than the context window of 16; (12, ...): 13 + 5 > 16, so that
    # answer is scored in its own row
    for c, answers in [(5, (1, 3, 2, 4)), (9, (2, 2)), (3, (6, 1, 1)), (8, (5, 6, 4)), (12, (3, 5))]:
        ctx = [1, *ids(c)]
        requests += [(ctx, ids(k)) for k in answers]
    requests += [([1, *ids(4)], [7, 8]), ([1, *ids(6)], [7, 8])]  # WinoGrande-like: contexts differ
    ctx = [1, 5, 7]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    requests += [(ctx, [nxt]), (ctx, [nxt, 3])]  # an all-greedy answer in a shared pack
    scorer = ev_scorer.LogLikelihoodScorer(model, TOK, batch_size=3)
    got = scorer.loglikelihood(requests)
    for (c, k), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = reference_loglikelihood(model, c, k)
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-5)
        assert greedy == ref_greedy
    assert got[-2][1] is True
    separate = sum(min(len(c) + len(k), 17) - 1 for c, k in requests)
    assert scorer.forward_tokens < separate - 20  # each shared context fed once
    assert scorer.scored_tokens == sum(len(k) for _, k in requests)
