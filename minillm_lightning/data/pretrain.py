"""PretrainDataModule: text corpora -> SentencePiece tokenizer -> LitData token chunks -> streamed blocks.

Nothing here holds the corpus in memory. Preparation scans every file once (streaming, for a content hash and a
document count), draws one split label per document, trains the tokenizer on a bounded sample, and tokenizes
byte ranges of the files in ``litdata.optimize`` worker processes into a *prepared directory*. Training streams
``seq_len + 1``-token windows of its chunks with LitData's ``StreamingDataset``; a checkpoint carries the loader's
position, so a resume continues mid-epoch with the very next batch. The checks of the options, the sources and
a prepared directory live in :mod:`minillm_lightning.data.pretrain_checks`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NewType

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from minillm_lightning.data.common import DataError, check_fits_model, expand_paths, write_stats
from minillm_lightning.data.pretrain_checks import (
    check_corpus,
    check_options,
    check_source_list,
    check_source_shares,
    exists,
    load_given_tokenizer,
    read_bytes,
    read_prepared_meta,
    warn_skipped,
)
from minillm_lightning.data.shards import (
    COMPLETE,
    LONG_DOC,
    SPLITS,
    TEST,
    TRAIN,
    VAL,
    FileScan,
    ResumableStreamingLoader,
    Task,
    TokenBlocks,
    TokenizeJob,
    _pieces,
    draw_labels,
    is_remote,
    iter_task_texts,
    scan_file,
    write_split,
)
from minillm_lightning.fileio import atomic_write_text, file_lock
from minillm_lightning.lightning_private import batches_done_in_epoch
from minillm_lightning.tokenizer import ModelType, Tokenizer, TokenizerSettings, train_or_load

FORMAT_VERSION = 2  # bump when the prepared directory's layout or tokenization changes: part of every cache key
# 2: a byte-order mark opening a .txt source is no text (prepared directories and tokenizers of 1 hold its tokens)


@dataclass
class PretrainSource:
    """One corpus entry (the seed's ``dataset_sampling``). In ``sources``, ``val_sources`` and ``test_sources`` a
    plain string stands for ``PretrainSource(path=<string>)``: ``[a.jsonl, {path: b.txt, sample_ratio: 0.5}]``."""

    path: str
    """File or glob of .txt / .jsonl / .json files."""
    sample_ratio: float | None = None
    """Share of this source's documents to use (default: the data module's ``sample_ratio``)."""
    val_share: float | None = None
    """Share of the sampled documents held out for validation (default: the data module's ``val_share``).
    A .txt file is one document: its last ``val_share`` of characters is the validation text."""
    text_field: str | None = None
    """JSON field holding the text (default: the data module's ``text_field``)."""


SourcePath = NewType("SourcePath", str)
"""A source given as its path/glob alone: ``PretrainSource(path=<it>)``. A type of its own, not ``str``: where an
entry fails to parse, jsonargparse takes the raw command-line text for a ``str`` member of the union (e.g. one
entry per record of a .json array named alone)."""


@dataclass
class _File:
    """One source file in the plan: which split(s) it feeds and its scan."""

    group: str  # "train" (train + val share), "val" or "test"
    source: PretrainSource
    index: int  # position among all files of the plan (seeds its labels)
    scan: FileScan


def as_sources(name: str, value: Any) -> list[PretrainSource]:
    """The entries of the ``name`` option (``sources``, ``val_sources``, ``test_sources``) as PretrainSources, a
    string meaning ``PretrainSource(path=<string>)``; a one-line ConfigError for a malformed option or share.

    The option's annotation takes one string too, tried before the list: jsonargparse would otherwise read the file
    ``--data.init_args.sources data/x.txt`` names as a list of paths, one per line (the corpus's own lines).
    ``check_source_list`` refuses that string with the list syntax.
    """
    out = [
        item
        if isinstance(item, PretrainSource)
        else PretrainSource(**({"path": item} if isinstance(item, str) else item))
        for item in check_source_list(name, value, PretrainSource)
    ]
    check_source_shares(name, out)
    return out


class PretrainDataModule(L.LightningDataModule):
    """Pretraining corpora: sampling, tokenizer training (cached), LitData token chunks and streamed blocks.

    Args:
        sources: corpus entries, a list: each a path/glob, or a mapping with the path and an optional per-source
            sample ratio, validation share and text field (``[a.jsonl, {path: b.txt, sample_ratio: 0.5}]``).
        seq_len: tokens per training block (must not exceed the model's ``block_size``).
        batch_size: blocks per batch on each device.
        sample_ratio: share of the documents to use of every source that sets no ``sample_ratio`` of its own (the
            seed's global sample ratio).
        val_share: share held out for validation of every source that sets no ``val_share`` of its own (ignored
            when ``val_sources`` is given).
        val_sources: explicit validation files (a list, as ``sources``); the ``sources`` then feed training only.
        test_sources: held-out test files (a list, as ``sources``), scored by ``minillm test`` (``test/loss``,
            ``test/ppl``, ``test/bpb``).
        text_field: JSON field with the document text.
        tokenizer: an existing tokenizer (.model file or a .ckpt carrying one); when unset one is trained.
        vocab_size: vocabulary size of a newly trained tokenizer.
        tokenizer_type: SentencePiece algorithm: bpe (byte fallback), unigram (byte fallback) or char.
        character_coverage: share of characters the tokenizer covers directly (the rest fall back to bytes).
        tokenizer_sample_bytes: about how much training text a new tokenizer sees (documents sampled uniformly
            across the corpus); bounds the memory of tokenizer training whatever the corpus size.
        retrain_tokenizer: train a new tokenizer even if the cache holds one for this corpus.
        cache_dir: where tokenizers and prepared datasets are kept.
        dataset_dir: use (or prepare into) this directory instead of ``<cache_dir>/tokens/<content hash>``. A
            complete directory is used as is, without reading the sources; it may be a LitData URI such as
            ``s3://bucket/prefix`` (prepared locally and uploaded: preparation writes local folders only).
        prepare_workers: processes that tokenize (default: the CPU count).
        chunk_tokens: tokens per LitData chunk file (the unit of shuffling and of memory mapping).
        skip_bad_records: skip and count malformed lines instead of stopping at the first one.
        num_workers: DataLoader worker processes.
        seed: seed of document sampling and of the batch order.
        block_stride: training windows start every ``block_stride`` tokens (default ``seq_len``: every token is a
            target once). Smaller strides give overlapping windows at more offsets, which helps small corpora.
    """

    def __init__(
        self,
        sources: SourcePath | list[SourcePath | PretrainSource],
        seq_len: int = 256,
        batch_size: int = 16,
        sample_ratio: float = 1.0,
        val_share: float = 0.05,
        val_sources: SourcePath | list[SourcePath | PretrainSource] | None = None,
        test_sources: SourcePath | list[SourcePath | PretrainSource] | None = None,
        text_field: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        tokenizer_type: ModelType = "bpe",
        character_coverage: float = 0.995,
        tokenizer_sample_bytes: int = 64_000_000,
        retrain_tokenizer: bool = False,
        cache_dir: str = "data/.cache",
        dataset_dir: str | None = None,
        prepare_workers: int | None = None,
        chunk_tokens: int = 4 << 20,
        skip_bad_records: bool = False,
        num_workers: int = 0,
        seed: int = 1337,
        block_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.sources, self.val_sources, self.test_sources = (
            as_sources("sources", sources),
            as_sources("val_sources", val_sources),
            as_sources("test_sources", test_sources),
        )
        check_options(
            sources=self.sources,
            dataset_dir=dataset_dir,
            cache_dir=cache_dir,
            seq_len=seq_len,
            batch_size=batch_size,
            vocab_size=vocab_size,
            chunk_tokens=chunk_tokens,
            tokenizer_sample_bytes=tokenizer_sample_bytes,
            sample_ratio=sample_ratio,
            val_share=val_share,
            character_coverage=character_coverage,
            num_workers=num_workers,
            block_stride=block_stride,
        )
        self.block_stride = block_stride
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.sample_ratio, self.val_share, self.text_field = sample_ratio, val_share, text_field
        self.tokenizer_path, self.retrain_tokenizer = tokenizer, retrain_tokenizer
        self.tok_settings = TokenizerSettings(vocab_size, tokenizer_type, character_coverage)
        self.tokenizer_sample_bytes = tokenizer_sample_bytes
        self.cache_dir, self.skip_bad = Path(cache_dir), skip_bad_records
        self.dataset_dir, self.prepare_workers, self.chunk_tokens = dataset_dir, prepare_workers, chunk_tokens
        self._tokenizer: Tokenizer | None = None
        self._plan: list[_File] | None = None
        self._labels: dict[int, np.ndarray] = {}
        self._path: str | None = None
        self.meta: dict[str, Any] | None = None
        self._sources_warned = False
        self._checked: tuple[str, dict[str, Any]] | None = None  # (folder, its meta.json) once found intact
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None
        self.test_set: TokenBlocks | None = None

    # ---- the plan: files, scans, labels ----
    def _files(self) -> list[Path]:
        return [Path(f.scan.path) for f in self.plan()]

    def plan(self) -> list[_File]:
        """Every source file with its scan (content hash, document count, byte ranges), read streaming once and
        memoised in the cache directory while the file is unchanged."""
        if self._plan is None:
            plan: list[_File] = []
            groups = [("train", self.sources), ("val", self.val_sources), ("test", self.test_sources)]
            for group, sources in groups:
                for src in sources:
                    for path in expand_paths(src.path):
                        scan = scan_file(path, self.cache_dir, log=rank_zero_info)
                        plan.append(_File(group, src, len(plan), scan))
            self._plan = plan
        return self._plan

    def _ratio(self, f: _File) -> float:
        return self.sample_ratio if f.source.sample_ratio is None else f.source.sample_ratio

    def _val_share(self, f: _File) -> float:
        if f.group != "train" or self.val_sources:
            return 0.0
        return self.val_share if f.source.val_share is None else f.source.val_share

    def labels(self, f: _File) -> np.ndarray:
        """One split label per document of ``f`` (JSONL/JSON), drawn from (seed, file position)."""
        if f.index not in self._labels:
            split = None if f.group == "train" else SPLITS[f.group]
            seed = [self.seed, f.index]
            self._labels[f.index] = draw_labels(f.scan.docs, self._ratio(f), self._val_share(f), seed, split)
        return self._labels[f.index]

    def _spec(self) -> dict[str, Any]:
        """Everything the prepared tokens depend on (the cache key), tokenizer aside."""
        files = [
            {
                "group": f.group,
                "name": Path(f.scan.path).name,
                "sha256": f.scan.sha256,
                "sample_ratio": self._ratio(f),
                "val_share": self._val_share(f),
                "text_field": f.source.text_field or self.text_field,
            }
            for f in self.plan()
        ]
        return {"format": FORMAT_VERSION, "files": files, "seed": self.seed, "skip_bad": self.skip_bad}

    def _tokenizer_key(self) -> str:
        spec = {**self._spec(), "tokenizer": asdict(self.tok_settings), "sample_bytes": self.tokenizer_sample_bytes}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dataset_path(self) -> str:
        """The prepared directory this module uses: ``dataset_dir`` or ``<cache_dir>/tokens/<content hash>``."""
        if self._path is None:
            if self.dataset_dir:
                self._path = self.dataset_dir
            else:
                tok = self._given_tokenizer().sha256 if self.tokenizer_path else self._tokenizer_key()
                spec = {**self._spec(), "tokenizer": tok}
                key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
                self._path = str(self.cache_dir / "tokens" / key)
        return self._path

    def is_prepared(self) -> bool:
        """Whether the prepared directory is complete (its meta.json is written last)."""
        return exists(f"{self.dataset_path.rstrip('/')}/{COMPLETE}")

    def _prepared_meta(self) -> dict[str, Any]:
        """The prepared directory's meta.json once the folder is checked intact (see ``read_prepared_meta``)."""
        root = self.dataset_path.rstrip("/")
        if self._checked is None or self._checked[0] != root:  # prepare_data, the tokenizer and setup all ask
            self._checked = (root, read_prepared_meta(root))
        return self._checked[1]

    def _warn_sources(self, meta: dict[str, Any]) -> None:
        """Warn (once) about each source's skipped records, loudly when all the records it was to use were."""
        if not self._sources_warned:
            self._sources_warned = True
            warn_skipped(meta)

    # ---- reading documents (streamed) ----
    def _tasks(self, split: int, files: list[_File], labels_dir: Path) -> list[Task]:
        tasks: list[Task] = []
        for f in files:
            path = Path(f.scan.path)
            field = f.source.text_field or self.text_field
            common = dict(source=str(path), path=str(path), split=split, text_field=field, skip_bad=self.skip_bad)
            if path.suffix == ".txt":
                span = self._txt_span(f, split)
                if span:
                    tasks.append(Task(**common, labels="", start=span[0], end=span[1]))
                continue
            labels = self.labels(f)
            if not (labels == split).any():
                continue
            file = labels_dir / f"{f.index}.npy"
            if not file.is_file():
                file.parent.mkdir(parents=True, exist_ok=True)
                np.save(file, labels)
            if path.suffix == ".json":
                tasks.append(Task(**common, labels=str(file)))
                continue
            firsts = [r[2] for r in f.scan.ranges] + [f.scan.docs]
            for i, (start, end, first_doc, first_line) in enumerate(f.scan.ranges):
                if (labels[first_doc : firsts[i + 1]] == split).any():  # skip ranges with nothing of this split
                    task = Task(**common, labels=str(file), start=start, end=end, first_doc=first_doc)
                    task.first_line = first_line
                    tasks.append(task)
        return tasks

    def _txt_span(self, f: _File, split: int) -> tuple[int, int] | None:
        """A .txt file is one document: its first ``sample_ratio`` of characters, the last ``val_share`` of which
        is validation (nanoGPT style); an explicit val/test file is wholly that split."""
        n = int(f.scan.docs * self._ratio(f))
        if f.group != "train":
            return (0, n) if split == SPLITS[f.group] and n else None
        cut = int(n * (1 - self._val_share(f)))
        lo, hi = {TRAIN: (0, cut), VAL: (cut, n)}.get(split, (0, 0))
        return (lo, hi) if hi > lo else None

    def iter_documents(self, split: str = "train", labels_dir: Path | None = None):
        """Yield ``(file, text)`` of one split, streamed from disk one document at a time."""
        labels_dir = labels_dir or self.cache_dir / "labels" / self._tokenizer_key()
        groups = {"train": ["train"], "val": ["train", "val"], "test": ["test"]}[split]
        files = [f for f in self.plan() if f.group in groups]
        for task in self._tasks(SPLITS[split], files, labels_dir):
            for text in iter_task_texts(task):
                yield task.source, text

    def _check_plan(self) -> None:
        """Loud warnings for sources that contribute nothing, and an error for an empty training corpus."""
        files, train_docs = [], 0
        for f in self.plan():
            txt = f.scan.path.endswith(".txt")
            kept = (
                (self._txt_span(f, TRAIN) or self._txt_span(f, VAL) or self._txt_span(f, TEST)) is not None
                if txt
                else int((self.labels(f) > 0).sum())
            )
            if f.group == "train":
                train_docs += int(self._txt_span(f, TRAIN) is not None) if txt else int((self.labels(f) == TRAIN).sum())
            files.append((f.scan.path, f.scan.docs, self._ratio(f), bool(kept)))
        check_corpus(files, train_docs, [s.path for s in self.sources])

    # ---- tokenizer ----
    def _given_tokenizer(self) -> Tokenizer:
        """The tokenizer ``data.tokenizer`` names (loaded once), or a one-line DataError."""
        if self._tokenizer is None:
            self._tokenizer = load_given_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.dataset_dir and self.is_prepared():  # a pinned prepared directory carries its tokenizer
                self._prepared_meta()  # an intact one
                self._tokenizer = Tokenizer(read_bytes(f"{self.dataset_dir.rstrip('/')}/tokenizer.model"))
            elif self.tokenizer_path:
                self._tokenizer = self._given_tokenizer()
            else:
                self._check_plan()
                path, reused = train_or_load(
                    self._files(),
                    self._tokenizer_sample(),
                    self.tok_settings,
                    self.cache_dir / "tokenizers",
                    force=self.retrain_tokenizer,
                    log=rank_zero_info,
                    key=self._tokenizer_key(),
                )
                self.retrain_tokenizer = False  # retrain once, not again in every process/hook
                rank_zero_info(f"tokenizer: {path} ({'reused from cache' if reused else 'trained'})")
                self._tokenizer = Tokenizer.from_file(path)
        return self._tokenizer

    def _tokenizer_sample(self):
        """Training documents for the tokenizer: each kept with probability sample_bytes / corpus bytes, so the
        sample is spread over the whole corpus and its size is bounded (lazily streamed; only read on a miss)."""
        train = [f for f in self.plan() if f.group == "train"]
        total = sum(f.scan.size * self._ratio(f) * (1 - self._val_share(f)) for f in train)
        every = max(1.0, total / self.tokenizer_sample_bytes)
        labels_dir = self.cache_dir / "labels" / self._tokenizer_key()
        rng = np.random.default_rng(self.seed)
        fallback, kept = None, 0
        for task in self._tasks(TRAIN, train, labels_dir):
            texts = iter_task_texts(task, every=1 if task.path.endswith(".txt") else every, seed=self.seed)
            for text in texts:
                long = task.path.endswith(".txt") or len(text) >= LONG_DOC
                for piece in _pieces(text, LONG_DOC) if long and every > 1 else (text,):
                    if long and every > 1 and rng.random() * every >= 1:
                        fallback = fallback or piece  # a corpus of a few huge documents must not sample nothing
                        continue
                    kept += 1
                    yield piece
        if not kept and fallback:
            yield fallback

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- preparation ----
    def prepare_data(self) -> None:
        """Tokenize the corpus into the prepared directory unless it is complete (one process per node).

        The directory is built under a temporary name and renamed into place after its meta.json is written, so
        an interrupted preparation never leaves a directory a later run would take as complete; a lock file lets
        concurrent runs of the same corpus wait for one preparation instead of repeating it.
        """
        check_fits_model(self)
        if self.is_prepared():
            self._prepared_meta()  # complete, but intact?
            return
        final = self.dataset_path
        if is_remote(final):
            raise DataError(
                f"data.dataset_dir={final} is not a prepared dataset (no {COMPLETE}); prepare it locally with "
                f"`minillm prepare --config <config> --data.init_args.dataset_dir <local dir>`, then upload the folder"
            )
        final_dir = Path(final)
        with file_lock(final_dir.parent / f".{final_dir.name}.lock"):
            if self.is_prepared():
                return
            work = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
            try:
                self._prepare_into(final_dir, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)  # interrupted or done: no half-written folder stays behind

    def _prepare_into(self, final_dir: Path, work: Path) -> None:
        tok = self.tokenizer
        t0 = time.perf_counter()
        shutil.rmtree(work, ignore_errors=True)
        out = work / "dataset"
        out.mkdir(parents=True)
        (out / "tokenizer.model").write_bytes(tok.model_bytes)
        dtype = "uint16" if tok.vocab_size < 2**16 else "uint32"
        job = TokenizeJob(tokenizer=str(out / "tokenizer.model"), work_dir=str(work), dtype=dtype)
        workers = self.prepare_workers or os.cpu_count() or 1
        plan = self.plan()
        in_bytes = sum(f.scan.size for f in plan)
        rank_zero_info(f"preparing {final_dir} from {len(plan)} file(s), {in_bytes / 1e6:,.1f} MB, {workers} worker(s)")
        splits = {
            "train": [f for f in plan if f.group == "train"],
            "val": [f for f in plan if f.group in ("train", "val")],
            "test": [f for f in plan if f.group == "test"],
        }
        for name, files in splits.items():
            tasks = self._tasks(SPLITS[name], files, work / "labels")
            if tasks:
                rank_zero_info(f"tokenizing the {name} split: {len(tasks)} task(s)")
                write_split(tasks, out / name, job, workers, self.chunk_tokens)
        seconds = time.perf_counter() - t0
        meta = self._meta(work, plan, dtype, seconds)
        meta["prepare_workers"] = workers
        meta["input_bytes"] = in_bytes
        atomic_write_text(out / COMPLETE, json.dumps(meta, indent=2))  # last: marks the directory complete
        self._warn_sources(meta)
        try:
            os.rename(out, final_dir)
        except OSError:
            if not (final_dir / COMPLETE).is_file():  # a stale incomplete directory under the final name
                shutil.rmtree(final_dir, ignore_errors=True)
                os.rename(out, final_dir)
        shutil.rmtree(work, ignore_errors=True)
        total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] + meta["splits"]["test"]["tokens"]
        rank_zero_info(
            f"prepared {total:,} tokens in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s, "
            f"{in_bytes / 1e6 / max(seconds, 1e-9):,.1f} MB/s) -> {final_dir}"
        )

    def _meta(self, work: Path, plan: list[_File], dtype: str, seconds: float) -> dict[str, Any]:
        """Merge the workers' per-task statistics into the prepared directory's meta.json."""
        splits = {name: {"tokens": 0, "docs": 0, "chars": 0, "bytes": 0} for name in SPLITS}
        names = {v: k for k, v in SPLITS.items()}
        sources: dict[str, dict[str, Any]] = {}
        per_source: dict[str, int] = {}
        for f in plan:
            txt = f.scan.path.endswith(".txt")  # one document
            entry = {
                "raw_records": int(f.scan.docs > 0) if txt else f.scan.docs,
                "skipped": {},
                "sample_ratio": self._ratio(f),
                "group": f.group,
            }
            if not txt:  # documents kept (sampled and not skipped), counted below from the workers' statistics
                entry["sampled"] = 0
                entry.update({f"{split}_docs": 0 for split in SPLITS})
            sources.setdefault(f.scan.path, entry)
        for file in sorted((work / "stats").glob("*.json")):
            stat = json.loads(file.read_text())
            split = names[int(file.name.split("-")[0])]
            for key in ("tokens", "docs", "chars", "bytes"):
                splits[split][key] += stat[key]
            per_source[stat["source"]] = per_source.get(stat["source"], 0) + stat["tokens"]
            source = sources[stat["source"]]
            if "sampled" in source:
                source["sampled"] += stat["docs"]
                source[f"{split}_docs"] += stat["docs"]
            for reason, n in stat["skipped"].items():
                source["skipped"][reason] = source["skipped"].get(reason, 0) + n
        return {
            "format": FORMAT_VERSION,
            "dtype": dtype,
            "spec": self._spec(),
            "tokenizer_sha256": self.tokenizer.sha256,
            "splits": splits,
            "tokens_per_source": per_source,
            "sources": sources,
            "prepare_seconds": seconds,
        }

    # ---- serving ----
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.meta is not None:
            return
        check_fits_model(self)
        if not self.is_prepared():  # prepare_data is skipped when the module is used outside a Trainer
            self.prepare_data()
        root = self.dataset_path.rstrip("/")
        self.meta = meta = self._prepared_meta()
        self._warn_sources(meta)
        if meta.get("tokenizer_sha256") != self.tokenizer.sha256:
            raise DataError(
                f"{root} was prepared with another tokenizer ({meta.get('tokenizer_sha256', '?')[:12]} vs "
                f"{self.tokenizer.sha256[:12]}); point data.tokenizer at its tokenizer.model or prepare again"
            )
        world = self.trainer.world_size if self.trainer else 1
        block = self.seq_len + 1
        stride = self.block_stride or self.seq_len
        remote_cache = {"cache_dir": str(self.cache_dir / "stream")} if is_remote(root) else {}

        def dataset(split: str, shuffle: bool, stride: int) -> TokenBlocks | None:
            if meta["splits"][split]["tokens"] < block:
                return None
            return TokenBlocks(
                f"{root}/{split}",
                self.seq_len,
                stride,
                shuffle=shuffle,
                drop_last=shuffle,
                seed=self.seed,
                **remote_cache,
            )

        self.train_set = dataset("train", True, stride)
        self.val_set = dataset("val", False, self.seq_len)
        self.test_set = dataset("test", False, self.seq_len)
        n_train = _windows(f"{root}/train", block, stride)
        if self.train_set is None or (n_train is not None and n_train < world * self.batch_size):
            tokens = meta["splits"]["train"]["tokens"]
            raise DataError(
                f"the training split has {tokens:,} tokens = {n_train or 0} blocks of seq_len={self.seq_len}, fewer "
                f"than one batch ({self.batch_size} x {world} devices); add data, or lower seq_len/batch_size"
            )
        if self.val_set is None and (self.val_share > 0 or self.val_sources):
            rank_zero_warn(f"validation split has fewer than seq_len={self.seq_len}+1 tokens: no validation")
        self.stats = {
            "dataset_dir": root,
            "sources": meta["sources"],
            "tokens_per_source": meta["tokens_per_source"],
            "train_tokens": meta["splits"]["train"]["tokens"],
            "val_tokens": meta["splits"]["val"]["tokens"],
            "test_tokens": meta["splits"]["test"]["tokens"],
            "val_chars": meta["splits"]["val"]["chars"],
            "test_bytes": meta["splits"]["test"]["bytes"],
            "train_blocks": n_train,
            "val_blocks": _windows(f"{root}/val", block, self.seq_len) if self.val_set is not None else 0,
            "test_blocks": _windows(f"{root}/test", block, self.seq_len) if self.test_set is not None else 0,
            "seq_len": self.seq_len,
            "tokenizer_sha256": self.tokenizer.sha256,
            "vocab_size": self.tokenizer.vocab_size,
        }
        if self.trainer is not None:
            run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: call on every rank
            if self.trainer.is_global_zero:
                write_stats(run_dir, "pretrain", self.stats)

    def _per_token(self, split: str, unit: str) -> float | None:
        s = (self.meta or {}).get("splits", {}).get(split)
        return s[unit] / s["tokens"] if s and s["tokens"] and s[unit] else None

    @property
    def val_chars_per_token(self) -> float | None:
        """Characters per token of the validation text: turns nats/token into tokenizer-independent nats/char."""
        return self._per_token("val", "chars")

    @property
    def test_bytes_per_token(self) -> float | None:
        """UTF-8 bytes per token of the text ``test`` scores: turns nats/token into bits per byte."""
        return self._per_token(getattr(self, "_test_split", "test"), "bytes")

    def _progress(self) -> int:
        return batches_done_in_epoch(self.trainer)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return ResumableStreamingLoader(
            self.train_set,
            self._progress,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, dataset: TokenBlocks | None) -> DataLoader:
        if dataset is None:
            return DataLoader([])
        return ResumableStreamingLoader(dataset, lambda: 0, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is not None:
            return self._eval_loader(self.test_set)
        if self.test_sources:
            tokens = (self.meta or {}).get("splits", {}).get("test", {}).get("tokens", 0)
            raise DataError(
                f"test_sources {[s.path for s in self.test_sources]} hold {tokens:,} tokens, fewer than "
                f"seq_len+1={self.seq_len + 1}: nothing to score; add held-out text to them or lower seq_len"
            )
        if self.val_set is None:
            raise DataError(
                "no test split: set data.init_args.test_sources to held-out files (with at least seq_len+1 tokens)"
            )
        rank_zero_warn(
            "!!! no data.init_args.test_sources: `test` scores the VALIDATION split (held out from training, but "
            "seen by checkpoint selection); give test_sources for a true test score"
        )
        self._test_split = "val"
        return self._eval_loader(self.val_set)

    def state_dict(self) -> dict:
        return {"tokenizer_sha256": self.tokenizer.sha256, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("tokenizer_sha256") not in (None, self.tokenizer.sha256):
            raise DataError(
                "the checkpoint was trained with a different tokenizer than this data module builds "
                f"({state['tokenizer_sha256'][:12]} vs {self.tokenizer.sha256[:12]}); resume with the same data "
                "and tokenizer settings, or point data.tokenizer at the checkpoint"
            )


def _windows(split_dir: str, block: int, stride: int) -> int | None:
    """Windows of ``block`` tokens every ``stride`` in a LitData token directory (None when it is remote)."""
    if is_remote(split_dir):
        return None
    index = Path(split_dir) / "index.json"
    if not index.is_file():
        return 0
    dims = [c["dim"] or 0 for c in json.loads(index.read_text())["chunks"]]
    return sum((d - block) // stride + 1 for d in dims if d >= block)
