"""SentencePiece tokenizer: training with a content-hash cache, loading, and the one chat template.

The tokenizer travels inside every checkpoint as the serialized SentencePiece model bytes, so any
later stage or command rebuilds it from the checkpoint file alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from minillm_lightning.errors import DataError, MiniLLMError
from minillm_lightning.fileio import file_lock

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ModelType = Literal["bpe", "unigram", "char"]
ROLES = ("system", "user", "assistant")


def invalid_utf8(text: str) -> str | None:
    """Where ``text`` holds what UTF-8 cannot encode ("byte 0xff at character 3"), or None when it is valid.

    Python decodes command-line arguments (and stdin under a C or UTF-8 locale) with surrogateescape: a byte that is not
    UTF-8 becomes a lone surrogate, which SentencePiece refuses with an obscure cast error.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"{what} at character {e.start + 1}"
    return None


class Tokenizer:
    """A loaded SentencePiece model with the chat special tokens."""

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.im_start_id, self.im_end_id = self.sp.piece_to_id(IM_START), self.sp.piece_to_id(IM_END)
        if self.im_start_id == self.unk_id or self.im_end_id == self.unk_id:
            raise ValueError("this SentencePiece model lacks the chat tokens <|im_start|>/<|im_end|>; retrain it")
        # what a literal "<|im_start|>"/"<|im_end|>" written in message content encodes to: ordinary text pieces
        self._literal_ids = {self.im_start_id: self._text_pieces(IM_START), self.im_end_id: self._text_pieces(IM_END)}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """A SentencePiece ``.model`` file, or the tokenizer of a ``.ckpt`` checkpoint."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        if path.suffix == ".ckpt":
            return cls.from_checkpoint(path)
        return cls(path.read_bytes())

    @classmethod
    def from_checkpoint(cls, checkpoint: dict | str | os.PathLike, source: str = "checkpoint") -> Tokenizer:
        """The tokenizer a minillm checkpoint carries: ``checkpoint`` is the file's path or its loaded dict
        (``source`` names it in errors)."""
        if isinstance(checkpoint, (str, os.PathLike)):
            from minillm_lightning.checkpoint import load_checkpoint

            # mapped: only the tokenizer's bytes are read, not the weights (dropped at once, see load_checkpoint)
            return cls.from_checkpoint(load_checkpoint(checkpoint, mmap=True), source=str(checkpoint))
        blob = checkpoint.get("tokenizer", {}).get("model_bytes")
        if blob is None:
            raise ValueError(f"{source} carries no tokenizer (not written by minillm-lightning?)")
        return cls(blob)

    def state(self) -> dict:
        """What a checkpoint stores: the model bytes and their hash."""
        return {"model_bytes": self.model_bytes, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of plain text, with ``<s>`` before and ``</s>`` after when asked (the chat template is
        :meth:`encode_chat`)."""
        ids = self._sp_encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_content(self, text: str) -> list[int]:
        """Encode user-supplied text (chat message content, roles) so that it can never forge the template.

        SentencePiece matches the user-defined symbols ``<|im_start|>``/``<|im_end|>`` anywhere in its input, so
        :meth:`encode` turns those strings into the chat control ids. Here each such match is replaced by the
        string's characters as ordinary pieces (byte pieces where a character has none), so the control ids come only
        from the template. The symbols are hard boundaries for SentencePiece, so the text around them encodes exactly
        as :meth:`encode` would, and text without them encodes bit-identically to :meth:`encode`.
        """
        ids = self._sp_encode(text)
        if self.im_start_id not in ids and self.im_end_id not in ids:
            return ids
        out: list[int] = []
        for i in ids:
            out += self._literal_ids.get(i, (i,))
        return out

    def _sp_encode(self, text: str) -> list[int]:
        """SentencePiece's ids of ``text``; text that UTF-8 cannot encode is a DataError saying so, not a cast error."""
        try:
            return self.sp.encode(text)
        except RuntimeError:
            problem = invalid_utf8(text) if isinstance(text, str) else None
            if problem is None:
                raise
            raise DataError(f"the text {text[:40]!r} is not valid UTF-8 ({problem}); give UTF-8 text") from None

    def _text_pieces(self, text: str) -> list[int]:
        """``text`` as one ordinary piece per character, or its UTF-8 byte pieces where the character has none."""
        ids: list[int] = []
        for ch in text:
            i = self.sp.piece_to_id(ch)
            if i != self.unk_id and not self.sp.is_unused(i) and not self.sp.is_control(i):
                ids.append(i)
                continue
            for b in ch.encode("utf-8"):
                i = self.sp.piece_to_id(f"<0x{b:02X}>")
                ids.append(i if self.sp.is_byte(i) else self.unk_id)  # no byte fallback (char model): unknown
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (``<s>`` and ``</s>`` are dropped; the chat markers stay, as text)."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # ---- the chat template (ChatML), shared by SFT, preference data, generation, chat and PPO ----

    def encode_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Encode ``[{"role", "content"}, ...]`` as ``<|im_start|>role\\ncontent<|im_end|>\\n`` turns.

        Returns the ids and a same-length mask that is True exactly on the tokens an assistant turn
        produces: its content and its closing ``<|im_end|>`` (the header and the trailing newline are
        fixed by the template, so they are never trained). Roles and contents go through :meth:`encode_content`, so
        the control ids come only from the template, never from text. With ``add_generation_prompt`` the
        sequence ends with an open ``<|im_start|>assistant\\n`` header for the model to continue.
        """
        ids: list[int] = []
        mask: list[bool] = []
        newline = self.encode("\n")
        for m in messages:
            role, content = m["role"], m["content"]
            head = [self.im_start_id, *self.encode_content(f"{role}\n")]
            body = [*self.encode_content(content), self.im_end_id]
            ids += head + body + newline
            learn = role == "assistant"
            mask += [False] * len(head) + [learn] * len(body) + [False] * len(newline)
        if add_generation_prompt:
            head = self.generation_prompt()
            ids += head
            mask += [False] * len(head)
        return ids, mask

    def generation_prompt(self) -> list[int]:
        """The tokens that open the assistant's turn (``<|im_start|>assistant\\n``), where a reply starts."""
        return [self.im_start_id, *self.encode("assistant\n")]

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template as text (for display and docs); token-level code uses :meth:`encode_chat`."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


@dataclass
class TokenizerSettings:
    """How to train the SentencePiece model."""

    vocab_size: int = 4096
    model_type: ModelType = "bpe"
    character_coverage: float = 0.995
    max_sentences: int = 2_000_000
    """Sentences sampled from the corpus for training (SentencePiece input_sentence_size)."""


def _hash_inputs(files: Sequence[Path], settings: TokenizerSettings) -> str:
    h = hashlib.sha256(json.dumps(settings.__dict__, sort_keys=True).encode())
    for f in sorted(files):
        h.update(str(f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def train_or_load(
    files: Sequence[Path],
    texts: Iterable[str] | None,
    settings: TokenizerSettings,
    cache_dir: Path,
    force: bool = False,
    log=print,
    key: str | None = None,
) -> tuple[Path, bool]:
    """Return (path to tokenizer.model, reused?) training it only when the cache has no model for these inputs.

    ``texts`` is an iterable over the training sentences (called lazily, only when training is needed);
    ``files`` identifies the corpus for the cache key, unless the caller gives ``key`` (a hash it already holds of
    the corpus, its sampling and ``settings``), which saves reading the files again.
    """
    key = key or _hash_inputs([Path(f) for f in files], settings)
    out_dir = Path(cache_dir) / f"{settings.model_type}-{settings.vocab_size}-{key}"
    model_path = out_dir / "tokenizer.model"
    with file_lock(Path(cache_dir) / ".lock"):
        if model_path.is_file() and not force:
            return model_path, True
        if texts is None:
            raise ValueError("no corpus text to train the tokenizer on")
        t0 = time.perf_counter()
        proto = train_sentencepiece(texts, settings)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_path.with_suffix(".tmp")
        tmp.write_bytes(proto)
        os.replace(tmp, model_path)  # atomic: a reader never sees half a model
        (out_dir / "settings.json").write_text(
            json.dumps({**settings.__dict__, "files": [str(f) for f in files], "key": key}, indent=2)
        )
        vocab = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()  # below vocab_size on a small corpus
        size = f"vocab {vocab}" + (f" of {settings.vocab_size} requested" if vocab != settings.vocab_size else "")
        log(f"trained {settings.model_type} tokenizer ({size}) in {time.perf_counter() - t0:.1f}s")
        return model_path, False


def train_sentencepiece(texts: Iterable[str], settings: TokenizerSettings) -> bytes:
    """Train a SentencePiece model in memory and return its serialized bytes."""
    buf = io.BytesIO()
    byte_fallback = settings.model_type != "char"
    sentences = _Guarded(piece for t in texts for line in t.split("\n") if line.strip() for piece in split_long(line))
    try:
        _train(sentences, buf, settings, byte_fallback)
    except RuntimeError as e:
        if (
            sentences.error is not None
        ):  # the corpus reader failed (e.g. a bad line): its own error, not SentencePiece's
            raise sentences.error from None
        msg = str(e)
        if "required_chars" in msg:
            needed = msg.split(" vs ")[-1].split(".")[0] if " vs " in msg else "more"
            raise MiniLLMError(
                f"tokenizer vocab_size={settings.vocab_size} is smaller than the {needed} distinct characters "
                f"the corpus needs at character_coverage={settings.character_coverage}; raise vocab_size or lower "
                f"character_coverage (e.g. 0.98: rarer characters then fall back to bytes)"
            ) from None
        raise
    return buf.getvalue()


class _Guarded:
    """An iterator that remembers the exception its source raised: SentencePiece reports an error from inside its
    sentence iterator as a RuntimeError "INTERNAL", losing the original (e.g. a DataError naming file and line)."""

    def __init__(self, source: Iterator[str]) -> None:
        self.source, self.error = source, None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self.source)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise


# SentencePiece silently drops sentences longer than this many bytes (a corpus of such lines leaves it nothing)
MAX_SENTENCE_BYTES = 1 << 16
_SENTENCE = re.compile(r".*?(?:[.!?;。！？；]+\s*|$)", re.S)  # a sentence with its end and spaces


def split_long(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """``line`` itself, or, when its UTF-8 form exceeds ``max_bytes`` (a book stored as one line), pieces that end
    at sentence ends where possible and are hard-cut otherwise, each within ``max_bytes``."""
    if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    limit = max_bytes // 4  # characters: at most 4 UTF-8 bytes each
    piece = ""
    for sentence in filter(None, _SENTENCE.findall(line)):
        while len(sentence) > limit:  # no sentence end for a long stretch: cut it
            if piece:
                yield piece
                piece = ""
            yield sentence[:limit]
            sentence = sentence[limit:]
        if len(piece) + len(sentence) > limit:
            yield piece
            piece = ""
        piece += sentence
    if piece.strip():
        yield piece


def _train(sentences: Iterator[str], buf: io.BytesIO, settings: TokenizerSettings, byte_fallback: bool) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=buf,
        vocab_size=settings.vocab_size,
        model_type=settings.model_type,
        character_coverage=settings.character_coverage,
        byte_fallback=byte_fallback,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        user_defined_symbols=[IM_START, IM_END, "\n"],
        normalization_rule_name="identity",  # lossless round trip: no NFKC, keep spaces as written
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=settings.max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,  # a tiny corpus yields a smaller vocabulary instead of an error
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
