"""Every shipped config parses (and documents itself); the tiny recipes chain through one short pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from minillm_lightning.cli import main

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_stage_has_tiny_and_small_recipes() -> None:
    names = {p.stem for p in CONFIGS}
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo"):
        assert {f"{stage}_tiny", f"{stage}_small"} <= names, stage


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_and_starts_with_a_header(config: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    text = config.read_text()
    assert text.startswith("#") and "minillm fit --config configs/" + config.name in text
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("minillm_lightning.")
    assert printed["data"]["class_path"].startswith("minillm_lightning.")
    assert printed["trainer"]["max_steps"] > 0
