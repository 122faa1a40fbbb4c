"""``minillm generate`` (one-shot prompts) and ``minillm chat`` (interactive multi-turn chat) on any checkpoint.

minillm generate --checkpoint checkpoints/pretrain/last.ckpt --prompt "Once upon a time" --max_new_tokens 100
minillm chat --checkpoint checkpoints/sft/last.ckpt --system "You are a helpful assistant."
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from minillm_lightning.commands import CommandParser
from minillm_lightning.errors import MiniLLMError
from minillm_lightning.generation import ContextLengthError, GenerationConfig, TextGenerator
from minillm_lightning.tokenizer import invalid_utf8

DEFAULT_MAX_NEW = 256  # when --max_new_tokens is not given: this many, or what the context leaves
MAX_NEW_HELP = f"new tokens per answer (default: {DEFAULT_MAX_NEW} or whatever the model context leaves)"


def _parser(prog: str, description: str, max_new_help: str = MAX_NEW_HELP) -> argparse.ArgumentParser:
    p = CommandParser(prog=prog, description=description)
    p.add_argument("--checkpoint", required=True, help="checkpoint (.ckpt) of any stage; it carries its tokenizer")
    g = p.add_argument_group("decoding")
    g.add_argument("--max_new_tokens", type=int, default=None, help=max_new_help)
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 means greedy decoding")
    g.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens only (0: off)")
    g.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling probability mass (1: off)")
    g.add_argument(
        "--repetition_penalty", type=float, default=1.0, help="> 1 discourages tokens already present (1: off)"
    )
    g.add_argument(
        "--num_beams", type=int, default=1, help="beam search width (> 1: deterministic, ignores sampling options)"
    )
    g.add_argument(
        "--length_penalty", type=float, default=1.0, help="beam search: score / length**L (> 0 favours longer)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random)")
    g.add_argument("--no_cache", action="store_true", help="recompute the whole sequence every step (slow; checks)")
    d = p.add_argument_group("device")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    d.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights dtype; auto: bfloat16 on a GPU that supports it, else float32",
    )
    return p


def _load(args: argparse.Namespace) -> tuple[TextGenerator, str]:
    """The generator for ``--checkpoint`` on the requested device, and the checkpoint's stage."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MiniLLMError("--device cuda: no CUDA device is available; use --device cpu")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    gen = TextGenerator.from_checkpoint(args.checkpoint, device=device, dtype=getattr(torch, dtype))
    return gen, gen.meta.get("stage", "unknown")


def _config(args: argparse.Namespace, prompt_len: int, block_size: int, default_max: int) -> GenerationConfig:
    max_new = args.max_new_tokens
    if max_new is None:  # as much as fits, so the default never trips the context check
        max_new = max(1, min(default_max, block_size - prompt_len))
    try:
        return GenerationConfig(
            max_new_tokens=max_new,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            seed=args.seed,
            use_cache=not args.no_cache,
        )
    except ValueError as e:
        raise MiniLLMError(str(e)) from None


def _safe_stdout() -> None:
    """A terminal that cannot show some characters gets '?' instead of a crash mid-reply."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def _check_utf8(text: str, what: str) -> None:
    """``text`` from the command line is UTF-8 (Python keeps other bytes as surrogates SentencePiece cannot take)."""
    if problem := invalid_utf8(text):
        raise MiniLLMError(f"{what} is not valid UTF-8 ({problem}); give UTF-8 text (check the terminal's encoding)")


def _stream(gen: TextGenerator, ids: list[int], cfg: GenerationConfig) -> tuple[str, int]:
    """Print the continuation of ``ids`` as it is generated; return its text and its number of tokens."""
    pieces: list[str] = []
    tokens: list[int] = []
    for piece in gen.stream_text(ids, cfg, on_token=tokens.append):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(pieces), len(tokens)


def generate_main(argv: list[str]) -> None:
    """``minillm generate``: continue (or answer) each ``--prompt`` and print the result."""
    p = _parser("minillm generate", "Generate text from a checkpoint, streaming it to the terminal.")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several prompts")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap each prompt in the chat template as one user turn (default for every stage but pretrain)",
    )
    chat.add_argument("--no_chat", dest="chat", action="store_false", help="plain text continuation")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--no_stream", action="store_true", help="generate all prompts as one batch, print at the end")
    args = p.parse_args(argv)
    if args.system is not None and args.chat is False:
        p.error("--system applies to chat prompts only; drop --no_chat or --system")
    _config(args, 0, block_size=1 << 30, default_max=1)  # the decoding options, checked before the (slow) load
    for i, text in enumerate(args.prompt, 1):
        _check_utf8(text, f"--prompt {i}" if len(args.prompt) > 1 else "--prompt")
    _check_utf8(args.system or "", "--system")
    _safe_stdout()
    gen, stage = _load(args)
    use_chat = args.chat if args.chat is not None else stage != "pretrain"
    if args.system is not None and not use_chat:
        raise MiniLLMError(
            "--system applies to chat prompts only, and a pretrain checkpoint continues plain text by default; "
            "add --chat or drop --system"
        )
    block = gen.model.config.block_size
    prompts = [gen.encode_prompt(text, use_chat, args.system) for text in args.prompt]
    heads = [f"user: {t}\nassistant: " if use_chat else t for t in args.prompt]
    t0, n_tokens = time.perf_counter(), 0
    if args.no_stream:  # nothing is printed before generate() has checked the options and the prompts
        cfg = _config(args, max(len(x) for x in prompts), block, DEFAULT_MAX_NEW)
        outputs = gen.generate(prompts, cfg)
        n_tokens = sum(len(o) for o in outputs)
        for head, out in zip(heads, outputs):
            text = gen.tokenizer.decode([t for t in out if t not in gen.stop_tokens])
            print(f"{head}{text}\n")
    else:
        # streaming writes each prompt before its continuation is decoded: check the options and every prompt's
        # length first, so that an error is the only output instead of text glued onto a prompt already printed
        configs = [_config(args, len(ids), block, DEFAULT_MAX_NEW) for ids in prompts]
        for ids, cfg in zip(prompts, configs):
            gen.check_prompts([ids], cfg)
        for head, ids, cfg in zip(heads, prompts, configs):
            sys.stdout.write(head)
            _, n = _stream(gen, ids, cfg)
            n_tokens += n
            print("\n")
    dt = time.perf_counter() - t0
    if n_tokens:
        print(f"[{n_tokens} tokens in {dt:.2f}s, {n_tokens / dt:.1f} tokens/s]", file=sys.stderr)


def _fit_history(
    gen: TextGenerator, system: list[dict[str, Any]], turns: list[dict[str, Any]], budget: int
) -> tuple[list[dict[str, Any]], list[int]] | None:
    """Drop the oldest user/assistant pairs until the prompt leaves ``budget`` tokens; None if even the last
    user turn alone does not fit."""
    block = gen.model.config.block_size
    while True:
        ids = gen.tokenizer.encode_chat(system + turns, add_generation_prompt=True)[0]
        if len(ids) + budget <= block:
            return turns, ids
        if len(turns) <= 1:
            return None
        turns = turns[2:]


def chat_main(argv: list[str]) -> None:
    """``minillm chat``: read user messages line by line from stdin, stream the assistant's replies."""
    p = _parser(
        "minillm chat",
        "Chat with a checkpoint. Commands: /reset clears the conversation, /exit quits.",
        f"new tokens per reply (default: {DEFAULT_MAX_NEW} or half the model context, whichever is less; the oldest "
        "turns are dropped to leave room for them)",
    )
    p.add_argument("--system", default=None, help="system message placed before the conversation")
    args = p.parse_args(argv)
    _config(args, 0, block_size=1 << 30, default_max=1)  # the decoding options, checked before the (slow) load
    _check_utf8(args.system or "", "--system")
    _safe_stdout()
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is reported, not fatal to the whole chat
        sys.stdin.reconfigure(errors="surrogateescape")
    gen, stage = _load(args)
    block = gen.model.config.block_size
    budget = min(DEFAULT_MAX_NEW, block // 2) if args.max_new_tokens is None else args.max_new_tokens
    if budget >= block:
        raise ContextLengthError(f"--max_new_tokens {budget} leaves no room for a prompt in block_size={block}")
    cfg = _config(args, 0, block, budget)
    if stage == "pretrain":
        print("note: this is a pretrain checkpoint, not tuned for chat; replies may ramble", file=sys.stderr)
    print(f"chat with {args.checkpoint} ({stage}); /reset clears the conversation, /exit quits", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = []
    tty = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if text.startswith("/"):
            print(f"unknown command {text}; use /reset or /exit", file=sys.stderr)
            continue
        if problem := invalid_utf8(text):
            print(f"error: the message is not valid UTF-8 ({problem}); send UTF-8 text", file=sys.stderr)
            continue
        fitted = _fit_history(gen, system, history + [{"role": "user", "content": text}], budget)
        if fitted is None:
            print(f"error: message too long for the model context (block_size={block}); shorten it", file=sys.stderr)
            continue
        turns, ids = fitted
        if len(turns) < len(history) + 1:
            print(f"(dropped the {len(history) + 1 - len(turns)} oldest messages to fit the context)", file=sys.stderr)
        sys.stdout.write("assistant: ")
        try:
            reply, _ = _stream(gen, ids, cfg)
        except KeyboardInterrupt:
            reply = ""
            print(" [interrupted]", end="")
        print()
        history = turns + [{"role": "assistant", "content": reply}]
