"""The checks of :class:`~minillm_lightning.data.pretrain.PretrainDataModule`: its options, its sources, a given
tokenizer and a prepared directory, each failing with a one-line error that names the option or file and the fix.

Also the reads of a prepared directory that may be remote (``s3://...``, through fsspec): a protocol without its
filesystem package is a one-line error too. Nothing here keeps state: the data module memoises what it needs.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

from minillm_lightning.data.common import check_folder_option
from minillm_lightning.data.shards import COMPLETE, is_remote
from minillm_lightning.errors import ConfigError, DataError, MiniLLMError
from minillm_lightning.tokenizer import Tokenizer

if TYPE_CHECKING:
    from minillm_lightning.data.pretrain import PretrainSource


# ---- options ----
def check_options(
    *,
    sources: Sequence[Any],
    dataset_dir: str | None,
    cache_dir: str,
    seq_len: int,
    batch_size: int,
    vocab_size: int,
    chunk_tokens: int,
    tokenizer_sample_bytes: int,
    sample_ratio: float,
    val_share: float,
    character_coverage: float,
    num_workers: int,
    block_stride: int | None,
) -> None:
    """The data module's own options (not those of each source): a one-line error for the first bad one."""
    if block_stride is not None and not 1 <= block_stride <= seq_len:
        raise ValueError(f"PretrainDataModule.block_stride must be in [1, seq_len={seq_len}], got {block_stride}")
    if not sources and not dataset_dir:
        raise DataError("PretrainDataModule: `sources` is empty; give at least one file or glob")
    for name, value in [
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("vocab_size", vocab_size),
        ("chunk_tokens", chunk_tokens),
        ("tokenizer_sample_bytes", tokenizer_sample_bytes),
    ]:
        if value <= 0:
            raise ValueError(f"PretrainDataModule.{name} must be positive, got {value}")
    check_shares("PretrainDataModule", sample_ratio, val_share)
    if not 0.98 <= character_coverage <= 1:
        raise ConfigError(
            f"PretrainDataModule.character_coverage must be in [0.98, 1] (SentencePiece's range), got "
            f"{character_coverage}"
        )
    if num_workers < 0:
        raise ConfigError(f"PretrainDataModule.num_workers must be >= 0, got {num_workers}")
    if dataset_dir and not is_remote(dataset_dir):
        purpose = "a prepared dataset folder, or a new one to prepare into"
        check_folder_option("PretrainDataModule", "dataset_dir", dataset_dir, purpose)
    check_folder_option("PretrainDataModule", "cache_dir", cache_dir, "a folder for tokenizers and prepared datasets")


def check_shares(owner: str, sample_ratio: float | None, val_share: float | None, where: str = "") -> None:
    """A ConfigError naming the field, the allowed range and (``where``) the source for an out-of-range share."""
    if sample_ratio is not None and not 0 <= sample_ratio <= 1:
        raise ConfigError(
            f"{owner}.sample_ratio{where} must be in [0, 1] (a share of the documents), got {sample_ratio}"
        )
    if val_share is not None and not 0 <= val_share < 1:
        raise ConfigError(
            f"{owner}.val_share{where} must be in [0, 1) (a share held out for validation; training needs the rest), "
            f"got {val_share}"
        )


def check_source_list(name: str, value: Any, source_type: type[PretrainSource]) -> list[Any]:
    """The entries of the ``name`` option (``sources``, ``val_sources``, ``test_sources``): a list (None: empty) of
    paths/globs, mappings of the fields of ``source_type`` (``path`` required) and ``source_type`` instances. A
    one-line ConfigError showing the syntax for anything else, such as one string where the list belongs
    (``--data.init_args.sources x.jsonl``)."""
    option, flag = f"PretrainDataModule.{name}", f"--data.init_args.{name}"
    keys = [f.name for f in fields(source_type)]
    entry = f"a path, or a mapping with the keys {', '.join(keys)} (path required)"
    if value is None:
        return []
    if isinstance(value, str):
        if value.lstrip().startswith(("[", "{")) and "\n" not in value:  # a list the parser could not read
            raise ConfigError(f"{option}={value} is not a list of sources: each entry is {entry}")
        # the string itself only when it names files: jsonargparse replaces a file named alone by its text
        example = value if "\n" not in value and glob.glob(os.path.expanduser(value)) else "data/my_corpus.jsonl"
        raise ConfigError(
            f"{option} is a list of files or globs, not one string; write it in brackets: {flag} '[{example}]' "
            f"(in YAML: {name}: [{example}]), or as [{{path: {example}, sample_ratio: 0.5}}, ...]"
        )
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{option} must be a list of sources, each {entry}; got {value!r}")
    for i, item in enumerate(value):
        if isinstance(item, str) and "\n" in item:  # `--data.init_args.sources+ book.txt`: the file's text
            raise ConfigError(
                f"{option}[{i}] is lines of text, not a path: jsonargparse reads a file named alone (as in "
                f"`{flag}+ book.txt`) as a config and puts its text here; name it in brackets: {flag}+ '[book.txt]'"
            )
        if isinstance(item, (str, source_type)):
            continue
        unknown = [key for key in item if key not in keys] if isinstance(item, dict) else []
        if not isinstance(item, dict) or unknown or "path" not in item:
            what = f"the unknown key {unknown[0]!r}" if unknown else "no path" if isinstance(item, dict) else repr(item)
            raise ConfigError(f"{option}[{i}] is not a source ({what}): each entry is {entry}")
    return list(value)


def check_source_shares(name: str, sources: Sequence[PretrainSource]) -> None:
    """The shares of each entry of the ``name`` option (``sources``, ``val_sources``, ``test_sources``)."""
    for i, src in enumerate(sources):
        check_shares(f"PretrainDataModule.{name}[{i}]", src.sample_ratio, src.val_share, f" ({src.path})")


# ---- sources ----
def check_corpus(files: Sequence[tuple[str, int, float, bool]], train_docs: int, sources: Sequence[str]) -> None:
    """Loud warnings for source files that contribute nothing, and a DataError for an empty training corpus.

    ``files``: (path, records, sample ratio, whether it contributes any document) of each file of the plan;
    ``train_docs``: the documents of the training split; ``sources``: the ``sources`` paths/globs, for the error.
    """
    for path, records, ratio, contributes in files:
        if not contributes:
            rank_zero_warn(
                f"!!! data source {path} contributes NOTHING (records={records}, sample_ratio={ratio}); check its "
                f"path, text field and sample ratio",
            )
    if not train_docs:
        raise DataError(
            f"the pretraining corpus is empty after reading and sampling {list(sources)}; check the files are not "
            f"empty and sample_ratio > 0"
        )


def warn_skipped(meta: dict[str, Any]) -> None:
    """Warn about each source's skipped records (from a prepared directory's meta.json), loudly when all the
    records it was to use were skipped."""
    for path, source in meta.get("sources", {}).items():
        skipped = source.get("skipped") or {}
        if not skipped:
            continue
        rank_zero_warn(f"{path}: skipped {sum(skipped.values())} unusable records: {skipped}")
        if source.get("sampled") == 0:
            rank_zero_warn(
                f"!!! {path} contributes NOTHING: every record it was to use was skipped ({skipped}); check its "
                f"text_field and schema"
            )


# ---- a given tokenizer ----
def load_given_tokenizer(tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names, or a one-line DataError naming the option, the file and the fix."""
    file = Path(tokenizer_path or "")
    what = f"data.init_args.tokenizer={file}"
    fix = "set it to a SentencePiece .model file or a minillm .ckpt, or unset it to train a tokenizer"
    if file.is_dir():
        raise DataError(f"{what} is a directory; {fix}")
    if not file.is_file():
        raise DataError(f"{what} does not exist; {fix}")
    try:
        return Tokenizer.from_file(file)
    except MiniLLMError:
        raise
    except RuntimeError:  # SentencePiece cannot parse it
        raise DataError(f"{what} is not a SentencePiece model; {fix}") from None
    except (ValueError, OSError) as e:  # a model without the chat tokens, a .ckpt without a tokenizer
        raise DataError(f"{what}: {e}; {fix}") from None


# ---- a prepared directory ----
def read_prepared_meta(root: str) -> dict[str, Any]:
    """The meta.json of the prepared directory ``root`` once the folder is checked intact (for a local one: each
    split's index.json and the chunk files it lists); a one-line DataError otherwise, where LitData would fail deep
    in its reader or wait forever for a missing chunk file."""
    fix = f"delete {root} and prepare it again (`minillm prepare --config <config>`, or the same `minillm fit`)"
    try:
        meta = json.loads(read_bytes(f"{root}/{COMPLETE}"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{root}/{COMPLETE} is not valid JSON ({e}): the prepared dataset is damaged; {fix}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{root}/{COMPLETE} holds no `splits`: not a prepared dataset of minillm; {fix}")
    if not is_remote(root):
        needed = ["tokenizer.model"]
        for split, stats in meta["splits"].items():
            if stats.get("tokens"):
                index = Path(root, split, "index.json")
                try:
                    chunks = json.loads(index.read_text())["chunks"]
                    needed += [f"{split}/index.json", *(f"{split}/{c['filename']}" for c in chunks)]
                except FileNotFoundError:
                    needed.append(f"{split}/index.json")
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(
                        f"{index} is not a LitData index ({e}): the prepared dataset is damaged; {fix}"
                    ) from None
        missing = [name for name in needed if not Path(root, name).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"{root} is missing {missing[0]}{more}: the prepared dataset is incomplete; {fix}")
    return meta


def remote_fs(uri: str) -> tuple[Any, str]:
    """fsspec's filesystem and path for ``uri``; a DataError when its protocol is unknown or its package missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:  # "Install s3fs to access S3", "Protocol not known: xyz"
        raise DataError(
            f"{uri}: cannot read {uri.split('://')[0]}:// URLs ({e}); install the filesystem package they need "
            f"(e.g. pip install s3fs for s3://) or set data.init_args.dataset_dir to a local folder"
        ) from None


def exists(uri: str) -> bool:
    """Whether the file ``uri`` (a local path or a remote URI) exists."""
    if not is_remote(uri):
        return Path(uri).is_file()
    fs, path = remote_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The content of the file ``uri`` (a local path or a remote URI)."""
    if not is_remote(uri):
        return Path(uri).read_bytes()
    fs, path = remote_fs(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()
