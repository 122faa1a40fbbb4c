"""`minillm prepare --config X`: tokenize a config's corpus once into its prepared dataset directory.

Only the ``data`` section of the config is read (no model, no trainer). ``--data.init_args.*`` flags override it as
they do for ``fit``, e.g. ``--data.init_args.prepare_workers 4`` or ``--data.init_args.dataset_dir DIR``. A later
``minillm fit`` with the same data settings finds the directory by its content hash and starts training at once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from minillm_lightning.commands import CommandParser
from minillm_lightning.errors import ConfigError
from minillm_lightning.fileio import read_yaml_config


def prepare_main(argv: list[str]) -> None:
    ap = CommandParser(
        prog="minillm prepare",
        description="Tokenize a config's pretraining corpus once into a LitData dataset directory.",
        epilog="Other flags: --data.init_args.NAME VALUE overrides the config's data settings.",
    )
    ap.add_argument("--config", "-c", required=True, help="a training config (only its `data` section is used)")
    args, overrides = ap.parse_known_args(argv)
    bad = [a for a in overrides if a.startswith("--") and not a.startswith("--data.")]
    if bad:
        ap.error(f"unknown option {bad[0]} (only --data.* overrides are accepted)")
    dm = build_datamodule(Path(args.config), overrides)
    if not hasattr(dm, "dataset_path"):
        raise ConfigError(
            f"{args.config}: {type(dm).__name__} has no prepared dataset directory; `minillm prepare` prepares "
            f"PretrainDataModule corpora"
        )
    t0 = time.perf_counter()
    already = dm.is_prepared()
    dm.prepare_data()
    seconds = time.perf_counter() - t0
    meta = json.loads((Path(dm.dataset_path) / "meta.json").read_text()) if not already else None
    state = "already prepared" if already else f"prepared in {seconds:.1f}s"
    print(f"{dm.dataset_path}: {state}")
    if meta:
        tokens = {name: s["tokens"] for name, s in meta["splits"].items() if s["tokens"]}
        rate = meta["input_bytes"] / 1e6 / max(meta["prepare_seconds"], 1e-9)
        print(f"tokens: {json.dumps(tokens)}  ({rate:.2f} MB/s of input, {meta['prepare_workers']} worker(s))")


def build_datamodule(config: Path, overrides: list[str]):
    """Instantiate the config's data module alone (its ``data`` section plus ``--data.*`` overrides)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    section = read_yaml_config(config).get("data")  # a missing or broken file: one ConfigError naming it
    if not section:
        raise ConfigError(f"{config} has no `data` section to prepare")
    parser = ArgumentParser(prog="minillm prepare", exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        cfg = parser.parse_args(["--data", json.dumps(section), *overrides])
    except argparse.ArgumentError as e:  # one line naming the option, as `minillm fit` prints it
        from minillm_lightning.trainer_cli import concise_parser_error

        raise ConfigError(concise_parser_error(str(e), "minillm fit")) from None
    return parser.instantiate_classes(cfg).data
