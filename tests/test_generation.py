"""Tests of ``minillm_lightning.generation``: decoding strategies, KV cache, left padding, stop tokens, context
limit, log-probs and incremental decoding.

Two kinds of model: a small random MiniGPT (init_std=0.5 makes its distributions peaked and prompt-dependent,
so a wrong position or mask changes the output), and a hand-written bigram model whose next-token
probabilities we choose, for the cases where the right answer must be known in advance.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm_lightning.generation import (
    ContextLengthError,
    GenerationConfig,
    IncrementalDecoder,
    TextGenerator,
    top_k_filter,
    top_p_filter,
)
from minillm_lightning.model import MiniGPT, MiniGPTConfig

PROMPTS = [[5, 17, 3, 44, 9, 12, 30], [8, 2], [61], [7, 7, 7, 40]]  # ragged: the batch needs left padding
STOP = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: extra threads only add synchronisation (and stall badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> MiniGPT:
    torch.manual_seed(0)
    cfg = MiniGPTConfig(vocab_size=67, block_size=48, n_layer=2, dim=64, n_head=4, n_kv_head=2, init_std=0.5)
    return MiniGPT(cfg).eval()


@pytest.fixture(scope="module")
def gen(model: MiniGPT) -> TextGenerator:
    return TextGenerator(model, stop_tokens=(STOP,))


def greedy(**kw) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, **{"max_new_tokens": 20, **kw})


class _NoCache:
    """What the generator needs of a KV cache, for a model that needs none."""

    pos = 0

    def reorder(self, index: Tensor) -> None:
        pass


class BigramLM(nn.Module):
    """A model whose next-token distribution depends only on the current token: ``probs[current]``."""

    def __init__(self, probs: list[list[float]], block_size: int = 32) -> None:
        super().__init__()
        p = torch.tensor(probs, dtype=torch.float32)
        self.logits = nn.Parameter(p.clamp_min(1e-9).log())  # (V, V)
        self.config = SimpleNamespace(block_size=block_size, vocab_size=p.shape[0])

    def forward(self, idx: Tensor, *, position_ids=None, attn_mask=None, cache=None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits[idx])  # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int) -> _NoCache:
        return _NoCache()


def row(**p: float) -> list[float]:
    """A probability row over the bigram vocabulary below, e.g. row(A=0.6, B=0.4)."""
    names = ["pad", "S", "A", "B", "X", "Y", "E"]
    return [p.get(n, 0.0) for n in names]


# tokens: 0 pad, 1 S(tart), 2 A, 3 B, 4 X, 5 Y, 6 E(nd, the stop token)
S, A, B, X, Y, E = 1, 2, 3, 4, 5, 6
MYOPIC = BigramLM(
    [
        row(E=1.0),
        row(A=0.6, B=0.4),  # S: A looks better...
        row(X=0.55, Y=0.45),  # A -> nothing likely: the best path through A has p = 0.6 * 0.55 = 0.33
        row(X=0.99, Y=0.01),  # B -> X almost surely: S B X has p = 0.4 * 0.99 = 0.396
        row(E=1.0),
        row(E=1.0),
        row(E=1.0),
    ]
)


# ---- the KV cache and left padding change nothing ----


def test_greedy_with_cache_equals_without(gen: TextGenerator) -> None:
    assert gen.generate(PROMPTS, greedy()) == gen.generate(PROMPTS, greedy(use_cache=False))


def test_batched_left_padded_equals_one_by_one(gen: TextGenerator) -> None:
    batched = gen.generate(PROMPTS, greedy())
    assert batched == [gen.generate([p], greedy())[0] for p in PROMPTS]
    assert len({tuple(r) for r in batched}) == len(PROMPTS)  # prompt-dependent: a mask bug would show
    beams = gen.generate(PROMPTS, greedy(num_beams=3, max_new_tokens=8))
    assert beams == [gen.generate([p], greedy(num_beams=3, max_new_tokens=8))[0] for p in PROMPTS]
    assert beams == gen.generate(PROMPTS, greedy(num_beams=3, max_new_tokens=8, use_cache=False))


def test_stream_yields_the_generated_tokens(gen: TextGenerator) -> None:
    assert list(gen.stream(PROMPTS[0], greedy())) == gen.generate([PROMPTS[0]], greedy())[0]


# ---- strategies ----


def test_beam_search_with_one_beam_is_greedy(gen: TextGenerator) -> None:
    # num_beams=1 in a config means greedy/sampling, so call the beam search itself
    tokens, _ = gen._beam_search(PROMPTS, greedy(num_beams=1), gen.stop_tokens)
    assert tokens == gen.generate(PROMPTS, greedy())


def test_beam_search_beats_myopic_greedy() -> None:
    gen = TextGenerator(MYOPIC, stop_tokens=(E,))
    g = gen.generate_full([[S]], greedy(max_new_tokens=5), logprobs=True)
    b = gen.generate_full([[S]], greedy(max_new_tokens=5, num_beams=2), logprobs=True)
    assert g.tokens == [[A, X, E]]
    assert b.tokens == [[B, X, E]]
    assert b.logprobs[0].sum().item() == pytest.approx(math.log(0.4 * 0.99), abs=1e-5)
    assert b.logprobs[0].sum() > g.logprobs[0].sum()


def test_top_k_one_and_tiny_top_p_are_greedy(gen: TextGenerator) -> None:
    expected = gen.generate(PROMPTS, greedy())
    assert gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20, top_k=1, seed=3)) == expected
    assert gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20, top_p=1e-6, seed=3)) == expected
    assert gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20, seed=3)) != expected  # sampling does sample


def test_filters() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(scores, 2)).tolist() == [[True, False, False, True]]
    # probabilities ~ [.09, .64, .24, .03]: 0.7 needs the top two tokens, 0.5 only the first
    assert torch.isinf(top_p_filter(scores, 0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(top_p_filter(scores, 0.5)).tolist() == [[True, False, True, True]]


def test_seeded_sampling_is_reproducible(gen: TextGenerator) -> None:
    cfg = dict(max_new_tokens=20, temperature=1.2, top_k=20, top_p=0.95)
    a = gen.generate(PROMPTS, GenerationConfig(seed=1, **cfg))
    assert a == gen.generate(PROMPTS, GenerationConfig(seed=1, **cfg))
    assert a != gen.generate(PROMPTS, GenerationConfig(seed=2, **cfg))


def test_repetition_penalty_reduces_repeats() -> None:
    # every token is followed by 1 (p=.5), 2 (p=.3) or 3 (p=.2): greedy repeats 1 forever
    gen = TextGenerator(BigramLM([[0.0, 0.5, 0.3, 0.2]] * 4), stop_tokens=())
    plain = gen.generate([[0]], greedy(max_new_tokens=6))[0]
    assert plain == [1] * 6
    # penalty 3 on log-probs: log(.5) * 3 < log(.3), so a seen 1 loses to an unseen 2, then both to 3
    penalised = gen.generate([[0]], greedy(max_new_tokens=6, repetition_penalty=3.0))[0]
    assert penalised[:3] == [1, 2, 3]
    assert max(penalised.count(t) for t in set(penalised)) < 6


# ---- stop tokens, context limit, log-probs ----


def test_stop_tokens_end_sequences() -> None:
    # S -> A -> E (stop); the stop token is returned, nothing after it
    chain = BigramLM([row(E=1.0), row(A=1.0), row(E=1.0), row(E=1.0), row(E=1.0), row(E=1.0), row(S=1.0)])
    gen = TextGenerator(chain, stop_tokens=(E,))
    assert gen.generate([[S], [A], [X, S]], greedy(max_new_tokens=10)) == [[A, E], [E], [A, E]]
    # without stop tokens E -> S -> A -> E ... runs to max_new_tokens
    assert gen.generate([[S]], greedy(max_new_tokens=5, stop_tokens=())) == [[A, E, S, A, E]]


def test_block_size_limit(gen: TextGenerator) -> None:
    block = gen.model.config.block_size
    prompt = list(range(10, 20))
    assert len(gen.generate([prompt], greedy(max_new_tokens=block - 10, stop_tokens=()))[0]) == block - 10
    with pytest.raises(ContextLengthError, match=f"block_size={block}; lower max_new_tokens to at most {block - 10}"):
        gen.generate([prompt], greedy(max_new_tokens=block - 9))
    with pytest.raises(ContextLengthError, match="shorten the prompt"):
        gen.generate([[1] * block], greedy(max_new_tokens=1))


def test_logprobs_match_a_full_forward(gen: TextGenerator, model: MiniGPT) -> None:
    """The returned log-probs are log_softmax(logits / T) of the returned tokens, recomputed here by teacher
    forcing, and are ordinary tensors that autograd code (PPO's loss) may use."""
    out = gen.generate_full(PROMPTS[:2], GenerationConfig(max_new_tokens=12, temperature=0.7, seed=0), logprobs=True)
    for prompt, toks, lps in zip(PROMPTS, out.tokens, out.logprobs):
        assert lps.shape == (len(toks),) and not lps.is_inference()
        seq = torch.tensor([prompt + toks])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1 : -1] / 0.7
        expected = F.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
        torch.testing.assert_close(lps, expected, atol=1e-4, rtol=1e-4)
    (lps * torch.ones(1, requires_grad=True)).sum().backward()  # usable in a graph


def test_training_mode_restored(model: MiniGPT) -> None:
    model.train()
    try:
        TextGenerator(model).generate([[1, 2]], greedy(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)


# ---- text level ----


def test_incremental_decoding_keeps_multibyte_characters(tiny_tokenizer) -> None:
    text = "Hello, 世界! 你好吗? 🙂 naïve café"
    ids = tiny_tokenizer.encode(text)
    decoder = IncrementalDecoder(tiny_tokenizer, skip_ids=[tiny_tokenizer.im_end_id])
    pieces = [decoder.push(i) for i in ids + [tiny_tokenizer.im_end_id]] + [decoder.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_helpers(tiny_pretrain_ckpt, tiny_tokenizer) -> None:
    from minillm_lightning.checkpoint import load_backbone

    model, _ = load_backbone(tiny_pretrain_ckpt)
    gen = TextGenerator(model, tiny_tokenizer)
    assert gen.stop_tokens == (tiny_tokenizer.im_end_id, tiny_tokenizer.eos_id)
    chat_ids = gen.encode_prompt("hi", chat=True)
    assert chat_ids[-len(tiny_tokenizer.generation_prompt()) :] == tiny_tokenizer.generation_prompt()
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
    texts = gen.generate_text(["The cat", "Once"], cfg)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert "".join(gen.stream_text(gen.encode_prompt("The cat"), cfg)) == texts[0]
    seen: list[int] = []  # on_token sees every generated id, what `minillm generate` counts for its tokens/s
    "".join(gen.stream_text(gen.encode_prompt("The cat"), cfg, on_token=seen.append))
    assert seen == gen.generate([gen.encode_prompt("The cat")], cfg)[0]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_pretrain_ckpt):
    from minillm_lightning.checkpoint import load_checkpoint
    from minillm_lightning.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(load_checkpoint(tiny_pretrain_ckpt))


# ---- the lean one-token decoding step (model/decode.py) equals MiniGPT.forward ----


@pytest.mark.parametrize(
    "arch, dtype",
    [
        (dict(n_head=4, n_kv_head=2), torch.float32),  # grouped-query attention
        (dict(n_head=4, n_kv_head=4, n_experts=3, top_k=2, n_shared_experts=1), torch.float32),  # MoE MLPs
        # bf16 (dense: in bf16 a rounding difference can flip an MoE routing choice, in either path)
        (dict(n_head=4, n_kv_head=2), torch.bfloat16),
    ],
)
def test_decode_step_equals_forward_on_a_padded_batch(arch: dict, dtype: torch.dtype) -> None:
    from minillm_lightning.model.decode import DecodeWeights, decode_step
    from minillm_lightning.model.gpt import padded_causal_mask

    torch.manual_seed(0)
    cfg = MiniGPTConfig(vocab_size=67, block_size=32, n_layer=2, dim=64, init_std=0.5, **arch)
    model = MiniGPT(cfg).eval().to(dtype)
    B, T, new = 3, 6, 5
    ids = torch.randint(5, 67, (B, T + new))
    keep = torch.ones(B, T + new, dtype=torch.bool)
    keep[1, :2] = keep[2, :5] = False  # rows 1 and 2 are left-padded
    pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, position_ids=pos, attn_mask=padded_causal_mask(keep, T + new)).logits.float()
        cache = model.new_cache(B, T + new)
        model(ids[:, :T], position_ids=pos[:, :T], attn_mask=padded_causal_mask(keep[:, :T], T), cache=cache)
        weights = DecodeWeights(model)
        # bf16: both paths round differently (fused vs separate matmuls); bound by ~2% of the logit scale
        scale = full.abs().max().item()
        tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=0.02 * scale)
        for t in range(T, T + new):
            logits = decode_step(model, weights, ids[:, t], pos[:, t], cache, keep[:, : t + 1])
            torch.testing.assert_close(logits, full[:, t], **tol)
        assert cache.pos == T + new
        with pytest.raises(ValueError, match="KV cache full"):
            decode_step(model, weights, ids[:, 0], pos[:, 0], cache, None)


def test_decode_weights_follow_the_current_parameters(gen: TextGenerator, model: MiniGPT) -> None:
    """The fused weights are rebuilt per generate call: after an update the output follows the new weights."""
    before = gen.generate(PROMPTS[:1], greedy())[0]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.layers[0].self_attn.q_proj.weight.mul_(-3.0)
            model.layers[1].mlp.up_proj.weight.mul_(-2.0)
        changed = gen.generate(PROMPTS[:1], greedy())[0]
        assert changed == gen.generate(PROMPTS[:1], greedy(use_cache=False))[0]
        assert changed != before
    finally:
        model.load_state_dict(saved)
