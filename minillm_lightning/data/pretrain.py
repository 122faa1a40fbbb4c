"""PretrainDataModule: text corpora -> SentencePiece tokenizer -> memory-mapped token cache -> packed blocks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from minillm_lightning.data.common import (
    DataError,
    ReadStats,
    ResumableDataLoader,
    ResumableSampler,
    expand_paths,
    iter_records,
    read_text_file,
    split_counts,
    write_stats,
)
from minillm_lightning.tokenizer import ModelType, Tokenizer, TokenizerSettings, train_or_load


@dataclass
class PretrainSource:
    """One corpus entry (the seed's ``dataset_sampling``)."""

    path: str
    """File or glob of .txt / .jsonl / .json files."""
    sample_ratio: float | None = None
    """Share of this source's documents to use (default: the data module's ``sample_ratio``)."""
    val_share: float | None = None
    """Share of the sampled documents held out for validation (default: the data module's ``val_share``).
    A .txt file is one document: its last ``val_share`` of characters is the validation text."""
    text_field: str | None = None
    """JSON field holding the text (default: the data module's ``text_field``)."""


class PackedBlocks(Dataset):
    """(input, target) windows of ``seq_len`` tokens over one flat token array, starting every ``stride``
    tokens (``stride = seq_len``: non-overlapping blocks; ``stride = 1``: every offset, like nanoGPT's
    random windows, but as a permutation so no window repeats within an epoch)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int | None = None) -> None:
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride or seq_len
        self.n = max(0, (len(tokens) - 1 - seq_len) // self.stride + 1) if len(tokens) > seq_len else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.stride
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class PretrainDataModule(L.LightningDataModule):
    """Pretraining corpora: sampling, tokenizer training (cached), token cache and packed blocks.

    Args:
        sources: corpus entries; each a path/glob with optional per-source sample ratio and validation share.
        seq_len: tokens per training block (must not exceed the model's ``block_size``).
        batch_size: blocks per batch on each device.
        sample_ratio: share of every source's documents to use (the seed's global sample ratio).
        val_share: share of each source held out for validation.
        text_field: JSON field with the document text.
        tokenizer: an existing tokenizer (.model file or a .ckpt carrying one); when unset one is trained.
        vocab_size: vocabulary size of a newly trained tokenizer.
        tokenizer_type: SentencePiece algorithm: bpe (byte fallback), unigram (byte fallback) or char.
        character_coverage: share of characters the tokenizer covers directly (the rest fall back to bytes).
        retrain_tokenizer: train a new tokenizer even if the cache holds one for this corpus.
        cache_dir: where tokenizers and token caches are kept.
        skip_bad_records: skip and count malformed lines instead of stopping at the first one.
        num_workers: DataLoader worker processes.
        seed: seed of document sampling and of the batch order.
        block_stride: training windows start every ``block_stride`` tokens (default ``seq_len``: disjoint
            blocks). Smaller strides give overlapping windows at more offsets, which helps small corpora.
    """

    def __init__(
        self,
        sources: list[PretrainSource],
        seq_len: int = 256,
        batch_size: int = 16,
        sample_ratio: float = 1.0,
        val_share: float = 0.05,
        text_field: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        tokenizer_type: ModelType = "bpe",
        character_coverage: float = 0.995,
        retrain_tokenizer: bool = False,
        cache_dir: str = "data/.cache",
        skip_bad_records: bool = False,
        num_workers: int = 0,
        seed: int = 1337,
        block_stride: int | None = None,
    ) -> None:
        super().__init__()
        if block_stride is not None and not 1 <= block_stride <= seq_len:
            raise ValueError(f"PretrainDataModule.block_stride must be in [1, seq_len={seq_len}], got {block_stride}")
        self.block_stride = block_stride
        if not sources:
            raise DataError("PretrainDataModule: `sources` is empty; give at least one file or glob")
        for name, value in [("seq_len", seq_len), ("batch_size", batch_size), ("vocab_size", vocab_size)]:
            if value <= 0:
                raise ValueError(f"PretrainDataModule.{name} must be positive, got {value}")
        for name, value in [("sample_ratio", sample_ratio), ("val_share", val_share)]:
            if not 0 <= value <= 1:
                raise ValueError(f"PretrainDataModule.{name} must be in [0, 1], got {value}")
        self.sources = [s if isinstance(s, PretrainSource) else PretrainSource(**s) for s in sources]
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.sample_ratio, self.val_share, self.text_field = sample_ratio, val_share, text_field
        self.tokenizer_path, self.retrain_tokenizer = tokenizer, retrain_tokenizer
        self.tok_settings = TokenizerSettings(vocab_size, tokenizer_type, character_coverage)
        self.cache_dir, self.skip_bad = Path(cache_dir), skip_bad_records
        self._tokenizer: Tokenizer | None = None
        self._docs: tuple[list[tuple[str, str]], list[tuple[str, str]], dict] | None = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None

    # ---- corpus ----
    def _files(self) -> list[Path]:
        return [f for s in self.sources for f in expand_paths(s.path)]

    def _corpus_key(self) -> str:
        spec = [asdict(s) for s in self.sources] + [self.sample_ratio, self.val_share, self.text_field, self.seed]
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for f in self._files():
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def documents(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
        """(train, val) lists of (source, text) after sampling, plus per-source statistics."""
        if self._docs is not None:
            return self._docs
        rng = random.Random(self.seed)
        train: list[tuple[str, str]] = []
        val: list[tuple[str, str]] = []
        stats: dict[str, dict] = {}
        for src in self.sources:
            ratio = self.sample_ratio if src.sample_ratio is None else src.sample_ratio
            vshare = self.val_share if src.val_share is None else src.val_share
            field = src.text_field or self.text_field
            for path in expand_paths(src.path):
                rs = ReadStats()
                if path.suffix == ".txt":
                    text = read_text_file(path)
                    rs.records = 1 if text.strip() else 0
                    text = text[: int(len(text) * ratio)]  # a .txt file is one document: sample a prefix
                    cut = int(len(text) * (1 - vshare))  # nanoGPT style: the tail is the validation text
                    tr = [text[:cut]] if text[:cut].strip() else []
                    va = [text[cut:]] if text[cut:].strip() else []
                else:
                    docs = []
                    for lineno, rec in iter_records(path, rs, self.skip_bad):
                        value = rec.get(field)
                        if not isinstance(value, str):
                            problem = "missing" if value is None else f"a {type(value).__name__}, not a string"
                            if self.skip_bad:
                                rs.skip(f"field {field!r} {problem}")
                                continue
                            raise DataError(
                                f"{path}:{lineno}: field {field!r} is {problem}; set text_field to the field "
                                f"that holds the text (keys here: {sorted(rec)[:8]}) or skip_bad_records: true"
                            )
                        if value.strip():
                            docs.append(value)
                        else:
                            rs.skip("empty text")
                    rng.shuffle(docs)
                    keep = round(len(docs) * ratio)
                    n_tr, n_va = split_counts(keep, vshare)
                    tr, va = docs[:n_tr], docs[n_tr : n_tr + n_va]
                train += [(str(path), t) for t in tr]
                val += [(str(path), t) for t in va]
                stats[str(path)] = {
                    "raw_records": rs.records,
                    "skipped": rs.skipped,
                    "sample_ratio": ratio,
                    "sampled": len(tr) + len(va),
                    "train_docs": len(tr),
                    "val_docs": len(va),
                }
                if len(tr) + len(va) == 0:
                    rank_zero_warn(
                        f"!!! data source {path} contributes NOTHING (records={rs.records}, sample_ratio={ratio}); "
                        f"check its path, text field and sample ratio",
                    )
        if not train:
            raise DataError(
                f"the pretraining corpus is empty after reading and sampling {[s.path for s in self.sources]}; "
                f"check the files are not empty and sample_ratio > 0"
            )
        self._docs = (train, val, stats)
        return self._docs

    # ---- tokenizer ----
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path:
                self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
            else:
                texts = (t for _, t in self.documents()[0])
                path, reused = train_or_load(
                    self._files(),
                    texts,
                    self.tok_settings,
                    self.cache_dir / "tokenizers",
                    force=self.retrain_tokenizer,
                    log=rank_zero_info,
                )
                self.retrain_tokenizer = False  # retrain once, not again in every process/hook
                rank_zero_info(f"tokenizer: {path} ({'reused from cache' if reused else 'trained'})")
                self._tokenizer = Tokenizer.from_file(path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- token cache ----
    def _cache_paths(self) -> dict[str, Path]:
        d = self.cache_dir / "tokens" / f"{self._corpus_key()}-{self.tokenizer.sha256[:12]}"
        return {"train": d / "train.bin", "val": d / "val.bin", "meta": d / "meta.json"}

    def prepare_data(self) -> None:
        """Tokenize the sampled corpus once into uint16/uint32 token files (runs on one process per node)."""
        paths = self._cache_paths()
        if paths["meta"].is_file():
            return
        train, val, stats = self.documents()
        tok = self.tokenizer
        dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
        t0 = time.perf_counter()
        per_source: dict[str, int] = {}
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        for split, docs in (("train", train), ("val", val)):
            ids = tok.encode_batch([t for _, t in docs]) if docs else []
            flat = []
            for (src, _), seq in zip(docs, ids):
                flat.append(np.asarray(seq + [tok.eos_id], dtype=dtype))
                per_source[src] = per_source.get(src, 0) + len(seq) + 1
            arr = np.concatenate(flat) if flat else np.zeros(0, dtype=dtype)
            tmp = paths[split].with_suffix(".tmp")
            arr.tofile(tmp)
            os.replace(tmp, paths[split])
        seconds = time.perf_counter() - t0
        meta = {"dtype": np.dtype(dtype).name, "tokens_per_source": per_source, "tokenize_seconds": seconds}
        meta["val_chars"] = sum(len(t) for _, t in val)
        meta["val_tokens"] = int(paths["val"].stat().st_size // np.dtype(dtype).itemsize)
        meta["sources"] = stats
        tmp = paths["meta"].with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, paths["meta"])
        total = sum(per_source.values())
        rank_zero_info(f"tokenized {total:,} tokens in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        paths = self._cache_paths()
        if not paths["meta"].is_file():  # prepare_data is skipped when the module is used outside a Trainer
            self.prepare_data()
        meta = json.loads(paths["meta"].read_text())
        dtype = np.dtype(meta["dtype"])

        def load(p: Path) -> np.ndarray:
            return np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype=dtype)

        self.train_set = PackedBlocks(load(paths["train"]), self.seq_len, self.block_stride)
        self.val_set = PackedBlocks(load(paths["val"]), self.seq_len)
        world = self.trainer.world_size if self.trainer else 1
        if len(self.train_set) < world * self.batch_size:
            raise DataError(
                f"the training split has {len(self.train_set.tokens):,} tokens = {len(self.train_set)} blocks of "
                f"seq_len={self.seq_len}, fewer than one batch ({self.batch_size} x {world} devices); add data, "
                f"or lower seq_len/batch_size"
            )
        if len(self.val_set) == 0 and self.val_share > 0:
            rank_zero_warn(f"validation split has fewer than seq_len={self.seq_len}+1 tokens: no validation")
        self.stats = {
            "sources": meta["sources"],
            "tokens_per_source": meta["tokens_per_source"],
            "train_tokens": int(len(self.train_set.tokens)),
            "val_tokens": int(len(self.val_set.tokens)),
            "val_chars": meta.get("val_chars", 0),
            "train_blocks": len(self.train_set),
            "val_blocks": len(self.val_set),
            "seq_len": self.seq_len,
            "tokenizer_sha256": self.tokenizer.sha256,
            "vocab_size": self.tokenizer.vocab_size,
        }
        if self.trainer is not None:
            run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: call on every rank
            if self.trainer.is_global_zero:
                write_stats(run_dir, "pretrain", self.stats)

    @property
    def val_chars_per_token(self) -> float | None:
        """Characters per token of the validation text: turns nats/token into tokenizer-independent nats/char."""
        stats = getattr(self, "stats", None)
        if not stats or not stats["val_chars"] or not stats["val_tokens"]:
            return None
        return stats["val_chars"] / stats["val_tokens"]

    def _progress(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(len(self.train_set), world, rank, self.seed)
        return ResumableDataLoader(
            self.train_set,
            sampler,
            self._progress,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def state_dict(self) -> dict:
        return {"tokenizer_sha256": self.tokenizer.sha256, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("tokenizer_sha256") not in (None, self.tokenizer.sha256):
            raise DataError(
                "the checkpoint was trained with a different tokenizer than this data module builds "
                f"({state['tokenizer_sha256'][:12]} vs {self.tokenizer.sha256[:12]}); resume with the same data "
                "and tokenizer settings, or point data.tokenizer at the checkpoint"
            )
