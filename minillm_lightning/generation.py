"""Text generation: greedy, sampling (temperature, top-k, top-p, repetition penalty) and beam search over a
left-padded batch, with or without the KV cache, plus streaming and per-token log-probs for PPO.

Conventions:

- Prompts are lists of token ids. A batch is left-padded; RoPE positions count from each row's first real token
  and ``padded_causal_mask`` hides the padding, so a row generates exactly what it would generate alone.
- Returned tokens are the NEW tokens only. A sequence ends at its first stop token (default ``<|im_end|>`` and
  ``</s>``), which is included so callers can tell finished from cut-off sequences; the text helpers drop it.
- Context policy: the longest prompt plus ``max_new_tokens`` must fit ``model.config.block_size``, otherwise
  :class:`ContextLengthError` says by how much. Nothing is truncated silently: which end of a prompt may be
  dropped depends on the caller (``minillm chat`` drops the oldest turns, a plain prompt should be shortened).
- Log-probs are those of the policy, ``log_softmax(logits / temperature)`` (temperature 1 for greedy and beam
  search), before the repetition penalty and the top-k/top-p cut: what PPO recomputes in its training forward.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.model.decode import DecodeWeights, decode_step
from minillm_lightning.model.gpt import MiniGPT, padded_causal_mask
from minillm_lightning.tokenizer import Tokenizer

# a host sync ("are all rows finished?") every few steps instead of every step keeps a GPU queue busy
_SYNC_EVERY = 8
# attention kernels for decoding. Not cuDNN: it builds a plan per sequence length, and decoding grows the length
# every step (measured on an H200 in bf16: 19 instead of ~300 tokens/s for the tiny model)
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ContextLengthError(MiniLLMError):
    """The prompt plus ``max_new_tokens`` does not fit the model context (``block_size``)."""


@dataclass
class GenerationConfig:
    """How to generate. The defaults sample from the model's distribution unchanged (what PPO wants)."""

    max_new_tokens: int = 128
    """Upper bound on the number of new tokens per prompt (the stop token included)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 disables."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty (> 1 discourages) on tokens already in the prompt or the output; 1 disables."""
    num_beams: int = 1
    """Beam search width; > 1 switches to deterministic beam search (temperature, top_k, top_p are ignored)."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores sum(log p) / length**length_penalty (> 0 favours longer outputs)."""
    early_stopping: bool = False
    """Beam search: stop a prompt as soon as num_beams hypotheses are finished."""
    stop_tokens: tuple[int, ...] | None = None
    """Token ids that end a sequence; None uses the generator's defaults (<|im_end|> and </s>), () none."""
    seed: int | None = None
    """Seed of a private torch.Generator for sampling; None uses the global RNG."""
    use_cache: bool = True
    """Decode incrementally with the KV cache; False recomputes the whole sequence each step (reference path)."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                "temperature must be a number >= 0 (0 = greedy)",
            ),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty must be a number > 0 (1 = off)",
            ),
            (math.isfinite(self.length_penalty), "length_penalty must be a finite number (1 = the average log-prob)"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, f"seed must be in -2**63..2**63-1, got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GenerationConfig: {msg}")


@dataclass
class GenerationOutput:
    """New tokens per prompt and, when asked for, their log-probs (1-D float32 tensors, ordinary tensors that
    autograd code may use, on the model's device)."""

    tokens: list[list[int]]
    logprobs: list[Tensor] | None = None


# ---- logits processors: pure functions of (N, V) float32 scores ----


def apply_repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive and multiply negative scores of already seen tokens by ``penalty`` (Keskar et al., 2019)."""
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest scores per row, set the rest to -inf."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p`` (always the top one)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # the mass before this token already reaches p
    drop[..., 0] = False
    return scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch dropout off while generating (callbacks call us mid-training) and restore the mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Batch:
    """A left-padded batch being decoded: token buffer, key mask, RoPE positions and the optional KV cache.

    Buffers are allocated once for prompt + ``max_new`` tokens; ``length`` counts the filled columns.
    """

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_new: int, pad_id: int, cache: bool):
        self.model = model
        device = next(model.parameters()).device
        n, t = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, t + max_new), pad_id, dtype=torch.long)
        keep = torch.ones(n, t + max_new, dtype=torch.bool)
        for row, p in enumerate(prompts):
            ids[row, t - len(p) : t] = torch.tensor(list(p), dtype=torch.long)
            keep[row, : t - len(p)] = False
        self.ids, self.keep = ids.to(device), keep.to(device)  # (N, L) built on the host: one copy each
        self.pos = (self.keep.long().cumsum(-1) - 1).clamp(min=0)  # (N, L) positions from the first real token
        self.padded = any(len(p) < t for p in prompts)  # no padding: plain causal attention, faster kernels
        self.prompt_len = self.length = t
        self.cache = model.new_cache(n, t + max_new) if cache else None
        # one-token steps of a MiniGPT with a cache take the lean path (model/decode.py); other models use forward
        self.fast = DecodeWeights(model) if cache and isinstance(model, MiniGPT) else None

    def prefill(self) -> Tensor:
        """Logits (N, V) for the token after each prompt."""
        return self._forward(self.ids[:, : self.length])

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` (N,) and return the logits (N, V) for the next position."""
        self.ids[:, self.length] = tokens
        self.length += 1
        if self.cache is None:
            return self._forward(self.ids[:, : self.length])
        if self.fast is not None:
            keep = self.keep[:, : self.length] if self.padded else None
            positions = self.pos[:, self.length - 1]
            if not tokens.is_cuda:
                return decode_step(self.model, self.fast, tokens, positions, self.cache, keep)
            with sdpa_kernel(DECODE_BACKENDS):
                return decode_step(self.model, self.fast, tokens, positions, self.cache, keep)
        return self._forward(tokens[:, None])

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.ids, self.keep, self.pos = (x.index_select(0, index) for x in (self.ids, self.keep, self.pos))
        if self.cache is not None:
            self.cache.reorder(index)

    def _forward(self, idx: Tensor) -> Tensor:
        q = idx.shape[1]
        mask = padded_causal_mask(self.keep[:, : self.length], q) if self.padded else None
        kw = dict(position_ids=self.pos[:, self.length - q : self.length], attn_mask=mask, cache=self.cache)
        with sdpa_kernel(DECODE_BACKENDS):
            if isinstance(self.model, MiniGPT):  # the output head on the last position only
                hidden = self.model(idx, compute_logits=False, **kw).hidden[:, -1]  # (N, C)
                return self.model.lm_head(hidden).float()
            return self.model(idx, **kw).logits[:, -1].float()


class TextGenerator:
    """Generate from a MiniGPT (or any module with the same ``forward(idx, position_ids=, attn_mask=, cache=)``,
    ``config.block_size`` and, for the KV cache, ``new_cache(batch_size, max_len)``).

    Args:
        model: the decoder; put in eval mode for the duration of each call.
        tokenizer: needed by the text helpers and for the default stop tokens and pad id.
        stop_tokens: default stop tokens; None means ``<|im_end|>`` and ``</s>`` of the tokenizer.
        pad_id: id fed as left padding and after a row finished (never attended to, never returned).

    Example:
        >>> gen = TextGenerator.from_checkpoint("checkpoints/sft_tiny/last.ckpt")  # or TextGenerator(model, tokenizer)
        >>> gen.generate_text(["Once upon a time"], GenerationConfig(max_new_tokens=50, temperature=0.8, seed=0))
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        stop_tokens: Sequence[int] | None = None,
        pad_id: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if stop_tokens is None:
            stop_tokens = (tokenizer.im_end_id, tokenizer.eos_id) if tokenizer is not None else ()
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0)
        self.meta: dict = {}
        """What the checkpoint says of itself (``stage``, ``arch``, ...) with :meth:`from_checkpoint`; else empty."""

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> TextGenerator:
        """The trained backbone of a checkpoint of any stage (in eval mode, on ``device`` in ``dtype``) with the
        tokenizer the checkpoint carries: what ``minillm generate --checkpoint`` loads.

        Raises:
            CheckpointError: the file is missing, damaged, or not a minillm checkpoint.
        """
        from minillm_lightning.checkpoint import checkpoint_meta, load_backbone

        model, ckpt = load_backbone(path)
        try:
            tokenizer = Tokenizer.from_checkpoint(ckpt, str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        gen = cls(model.to(device=device, dtype=dtype), tokenizer)
        gen.meta = checkpoint_meta(ckpt, str(path))
        return gen

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- token-level API ----

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None) -> list[list[int]]:
        """New tokens for each prompt (ending with the stop token when one was produced)."""
        return self.generate_full(prompts, config).tokens

    def generate_full(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, logprobs: bool = False
    ) -> GenerationOutput:
        """Like :meth:`generate`; with ``logprobs`` also the policy log-prob of every returned token."""
        cfg = config or GenerationConfig()
        stops = self._stops(cfg)
        self.check_prompts(prompts, cfg)
        with _eval_mode(self.model):
            if cfg.num_beams > 1:
                tokens, lps = self._beam_search(prompts, cfg, stops)
            else:
                steps = list(self._sample_steps(prompts, cfg, stops, logprobs))
                tokens = [_cut(row, stops) for row in torch.stack([t for t, _ in steps], 1).tolist()]
                if logprobs:
                    per_step = torch.stack([lp for _, lp in steps], 1)  # (N, S)
                    lps = [per_step[i, : len(t)] for i, t in enumerate(tokens)]
        if not logprobs:
            return GenerationOutput(tokens)
        # clone outside inference mode: inference tensors cannot be saved for backward by PPO's loss
        return GenerationOutput(tokens, [lp.clone() for lp in lps])

    def stream(self, prompt: Sequence[int], config: GenerationConfig | None = None) -> Iterator[int]:
        """Yield the new tokens of one prompt as they are produced (beam search yields them all at the end)."""
        cfg = config or GenerationConfig()
        stops = self._stops(cfg)
        if cfg.num_beams > 1:
            yield from self.generate([prompt], cfg)[0]
            return
        self.check_prompts([prompt], cfg)
        with _eval_mode(self.model):
            for tok, _ in self._sample_steps([prompt], cfg, stops, False):
                t = int(tok[0])
                yield t
                if t in stops:
                    return

    def stream_batch(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None
    ) -> Iterator[list[int]]:
        """Yield the next token of every prompt, one step at a time, decoding the batch together (``minillm serve``).

        Rows that already produced a stop token get ``pad_id``. Steps end after ``max_new_tokens`` or soon after
        every row finished; closing the iterator stops decoding. Greedy or sampling only (no beam search).
        """
        cfg = config or GenerationConfig()
        if cfg.num_beams > 1:
            raise ValueError("stream_batch decodes step by step; beam search needs generate()")
        stops = self._stops(cfg)
        self.check_prompts(prompts, cfg)
        with _eval_mode(self.model):
            for tok, _ in self._sample_steps(prompts, cfg, stops, False):
                yield tok.tolist()

    # ---- text-level helpers (need the tokenizer) ----

    def encode_prompt(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt: a single user turn in the chat template, or plain text continuing a document.

        A plain prompt starts after ``</s>``, as every document after the first does in the packed pretraining
        stream, so an empty prompt means "start a new document".
        """
        tok = self._tokenizer()
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return tok.encode_chat(messages, add_generation_prompt=True)[0]
        return [tok.eos_id, *tok.encode(text)]

    def generate_text(
        self, prompts: Sequence[str], config: GenerationConfig | None = None, chat: bool = False
    ) -> list[str]:
        """Batched text in, generated text out (stop tokens dropped): a list of prompts, a list of replies."""
        if isinstance(prompts, str):
            raise TypeError("generate_text takes a list of prompts; for one prompt pass [text] (and read [0])")
        ids = self.generate([self.encode_prompt(p, chat) for p in prompts], config)
        stops = self._stops(config or GenerationConfig())
        return [self._tokenizer().decode([t for t in row if t not in stops]) for row in ids]

    def stream_text(
        self,
        prompt: Sequence[int],
        config: GenerationConfig | None = None,
        on_token: Callable[[int], object] | None = None,
    ) -> Iterator[str]:
        """Yield printable text pieces of one prompt's continuation; multi-byte characters are never split.
        ``on_token`` sees every new token id (stop tokens included), e.g. ``list.append`` to count them."""
        decoder = IncrementalDecoder(self._tokenizer(), skip_ids=self._stops(config or GenerationConfig()))
        for t in self.stream(prompt, config):
            if on_token is not None:
                on_token(t)
            piece = decoder.push(t)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    # ---- internals ----

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("TextGenerator was built without a tokenizer; the text helpers need one")
        return self.tokenizer

    def _stops(self, cfg: GenerationConfig) -> tuple[int, ...]:
        return self.stop_tokens if cfg.stop_tokens is None else tuple(cfg.stop_tokens)

    def check_prompts(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> None:
        """Raise :class:`ContextLengthError` if the longest prompt plus ``max_new_tokens`` exceeds ``block_size``
        (ValueError for no prompt or an empty one). The generate methods call it; a caller that prints before
        generating (``minillm generate``) calls it first, so that an error is not printed after its output."""
        if isinstance(prompts, str) or any(isinstance(p, str) for p in prompts):
            raise TypeError(
                "prompts here are token ids (lists of int); for text use generate_text(), or encode it with "
                "encode_prompt(text, chat=...)"
            )
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        block = self.model.config.block_size
        longest = max(len(p) for p in prompts)
        if longest + cfg.max_new_tokens > block:
            fix = (
                f"lower max_new_tokens to at most {block - longest} or shorten the prompt"
                if longest < block
                else f"shorten the prompt to fewer than {block} tokens"
            )
            raise ContextLengthError(
                f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the model context "
                f"block_size={block}; {fix}"
            )

    def _rng(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    @staticmethod
    def _seen(batch: _Batch, vocab: int) -> Tensor:
        """(N, V) True for the tokens of each prompt (padding excluded): the repetition penalty's memory."""
        n, t = batch.ids.shape[0], batch.prompt_len
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=batch.ids.device)
        keep = batch.keep[:, :t]
        rows = torch.arange(n, device=seen.device)[:, None].expand(n, t)
        seen[rows[keep], batch.ids[:, :t][keep]] = True
        return seen

    @torch.inference_mode()
    def _sample_steps(
        self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, stops: tuple[int, ...], want_lp: bool
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Yield (token (N,), log-prob (N,) or None) per step; finished rows get ``pad_id``."""
        batch = _Batch(self.model, prompts, cfg.max_new_tokens, self.pad_id, cfg.use_cache)
        rng = self._rng(cfg.seed)
        logits = batch.prefill()  # (N, V)
        seen = self._seen(batch, logits.shape[-1]) if cfg.repetition_penalty != 1.0 else None
        stop_ids = torch.tensor(stops, dtype=torch.long, device=logits.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
        for step in range(cfg.max_new_tokens):
            scores = apply_repetition_penalty(logits, seen, cfg.repetition_penalty) if seen is not None else logits
            if cfg.temperature == 0:
                tok = scores.argmax(-1)
            else:
                scores = top_p_filter(top_k_filter(scores / cfg.temperature, cfg.top_k), cfg.top_p)
                tok = torch.multinomial(scores.softmax(-1), 1, generator=rng).squeeze(1)
            tok = torch.where(finished, self.pad_id, tok)
            lp = None
            if want_lp:
                lp = F.log_softmax(logits / (cfg.temperature or 1.0), -1).gather(1, tok[:, None]).squeeze(1)
            yield tok, lp
            finished |= torch.isin(tok, stop_ids)
            if step + 1 == cfg.max_new_tokens or (stops and step % _SYNC_EVERY == 0 and bool(finished.all())):
                return
            if seen is not None:
                seen[torch.arange(len(tok), device=tok.device), tok] = True
            logits = batch.step(tok)

    @torch.inference_mode()
    def _beam_search(
        self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, stops: tuple[int, ...]
    ) -> tuple[list[list[int]], list[Tensor]]:
        """Beam search (Hugging Face semantics) over ``num_beams`` rows per prompt.

        Each step every prompt's K beams propose their K*V continuations; the 2K best are scanned in order:
        one ending in a stop token becomes a finished hypothesis (if it ranks among the top K), the others
        fill the K live beams. A prompt is done when it holds K hypotheses and (``early_stopping`` or no live
        beam can still beat the worst of them at the current length).
        """
        K, B = cfg.num_beams, len(prompts)
        batch = _Batch(
            self.model, [p for p in prompts for _ in range(K)], cfg.max_new_tokens, self.pad_id, cfg.use_cache
        )
        logits = batch.prefill()  # (B*K, V)
        V = logits.shape[-1]
        seen = self._seen(batch, V) if cfg.repetition_penalty != 1.0 else None
        # only the first beam of each prompt is live at the start, or the K identical beams would fill the beam
        beam_scores = torch.zeros(B, K, device=logits.device)
        beam_scores[:, 1:] = float("-inf")
        beam_scores = beam_scores.view(-1)  # (B*K,)
        history: list[list[int]] = [[] for _ in range(B * K)]
        history_lp: list[list[float]] = [[] for _ in range(B * K)]
        hyps: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(cfg.max_new_tokens):
            scores = apply_repetition_penalty(logits, seen, cfg.repetition_penalty) if seen is not None else logits
            logp = F.log_softmax(scores, -1)
            policy_lp = logp if seen is None else F.log_softmax(logits, -1)
            cand = (beam_scores[:, None] + logp).view(B, K * V)
            # enough candidates that K of them continue even if every beam's best tokens are stop tokens
            top_scores, top_idx = cand.topk(min(K * (1 + len(stops)), K * V), dim=1)  # (B, C)
            top_lp = policy_lp.view(B, K * V).gather(1, top_idx)
            rows = (top_idx // V + torch.arange(B, device=top_idx.device)[:, None] * K).tolist()
            toks, top_scores, top_lp = (top_idx % V).tolist(), top_scores.tolist(), top_lp.tolist()
            norm = (step + 1) ** cfg.length_penalty
            nxt_rows, nxt_toks, nxt_scores, nxt_lps = [], [], [], []
            for b in range(B):
                if done[b]:  # K placeholder beams keep the batch shape; their output is never used
                    nxt_rows += [b * K] * K
                    nxt_toks += [self.pad_id] * K
                    nxt_scores += [0.0] * K
                    nxt_lps += [0.0] * K
                    continue
                live = 0
                for rank, (row, t, s, lp) in enumerate(zip(rows[b], toks[b], top_scores[b], top_lp[b])):
                    if t in stops:
                        if rank < K:
                            hyps[b].append((s / norm, history[row] + [t], history_lp[row] + [lp]))
                            hyps[b] = sorted(hyps[b], key=lambda h: h[0], reverse=True)[:K]
                        continue
                    nxt_rows.append(row)
                    nxt_toks.append(t)
                    nxt_scores.append(s)
                    nxt_lps.append(lp)
                    live += 1
                    if live == K:
                        break
                if len(hyps[b]) == K:
                    best_live = max(nxt_scores[b * K : b * K + K]) / norm
                    done[b] = cfg.early_stopping or hyps[b][-1][0] >= best_live
            if all(done):
                break
            history = [history[r] + [t] for r, t in zip(nxt_rows, nxt_toks)]
            history_lp = [history_lp[r] + [lp] for r, lp in zip(nxt_rows, nxt_lps)]
            index = torch.tensor(nxt_rows, device=logits.device)
            tok = torch.tensor(nxt_toks, device=logits.device)
            beam_scores = torch.tensor(nxt_scores, device=logits.device)
            batch.reorder(index)
            if seen is not None:
                seen = seen.index_select(0, index)
                seen[torch.arange(len(tok), device=tok.device), tok] = True
            if step + 1 < cfg.max_new_tokens:
                logits = batch.step(tok)
        tokens, lps = [], []
        final = beam_scores.tolist()
        for b in range(B):
            if not done[b]:  # out of budget: the live beams compete with the finished hypotheses
                n = len(history[b * K]) or 1
                for row in range(b * K, b * K + K):
                    hyps[b].append((final[row] / n**cfg.length_penalty, history[row], history_lp[row]))
            _, best, best_lp = max(hyps[b], key=lambda h: h[0])
            tokens.append(best)
            lps.append(torch.tensor(best_lp, dtype=torch.float32, device=logits.device))
        return tokens, lps


def _cut(row: list[int], stops: tuple[int, ...]) -> list[int]:
    """The tokens up to and including the first stop token."""
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces that are safe to print.

    SentencePiece byte-fallback splits a CJK character or an emoji over several byte tokens; decoding them one by
    one would print replacement characters. Like Hugging Face's ``TextStreamer`` we decode a short window and only
    emit once the text no longer ends in an incomplete character; the window starts at the previous piece so
    word-initial spaces decode as they do in the full text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start, end of already-emitted tokens

    def push(self, token_id: int) -> str:
        """Add one token; return the newly printable text ('' while a character is incomplete)."""
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        prev = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prev = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prev) :]
