"""`minillm pipeline` bookkeeping, unit level (no training): when a real-data split is reused, and which
``max_steps`` / ``val_check_interval`` each stage runs with."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLE

from minillm_lightning.commands import pipeline, pipeline_report
from minillm_lightning.commands.pipeline import STAGES, PipelineError, prepare_real_data

ROLES = {"pretrain": "pretrain.jsonl", "sft": "sft.jsonl", "preference": "preference.jsonl"}


def _corpora(root: Path, lines: int | None = None) -> Path:
    """The shipped samples laid out as `minillm download` lays out real corpora (optionally their first lines)."""
    for role, name in ROLES.items():
        (root / role).mkdir(parents=True)
        text = (SAMPLE / name).read_text().splitlines(keepends=True)
        (root / role / name).write_text("".join(text[:lines] if lines else text))
    return root


def _records(out: Path) -> dict[str, dict[str, int]]:
    return {role: json.loads((out / "data_tiny" / role / "split.json").read_text())["records"] for role in ROLES}


def test_split_is_reused_only_for_the_same_sources(tmp_path: Path, capsys) -> None:
    a, b, out = _corpora(tmp_path / "a"), _corpora(tmp_path / "b", lines=40), tmp_path / "out"
    first = prepare_real_data(a, out, "tiny")
    assert "already split" not in capsys.readouterr().out
    assert prepare_real_data(a, out, "tiny") == first  # same sources: reused
    assert capsys.readouterr().out.count("already split") == 3

    # another corpus folder: split again, with a note saying why
    other = prepare_real_data(b, out, "tiny")
    said = capsys.readouterr().out
    assert "already split" not in said and "source files changed" in said
    assert sum(other["pretrain"]["records"].values()) == 40 < sum(first["pretrain"]["records"].values())
    assert _records(out)["pretrain"] == other["pretrain"]["records"]

    # a file added to the corpus folder is read too
    shutil.copy(SAMPLE / "pretrain.jsonl", b / "pretrain" / "more.jsonl")
    grown = prepare_real_data(b, out, "tiny")
    assert "source files changed" in capsys.readouterr().out
    assert sum(grown["pretrain"]["records"].values()) > 40
    assert grown["sft"]["records"] == other["sft"]["records"]

    # a file rewritten in place (same name, new size and time)
    with open(b / "sft" / "sft.jsonl", "a") as f:
        f.write(
            json.dumps(
                {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
            )
            + "\n"
        )
    prepare_real_data(b, out, "tiny")
    said = capsys.readouterr().out
    assert "data: sft: re-splitting (source files changed" in said
    assert "data: sft already split" not in said and "data: pretrain already split" in said


def test_touched_source_and_other_budget_split_again(tmp_path: Path, capsys, monkeypatch) -> None:
    data, out = _corpora(tmp_path / "corpora"), tmp_path / "out"
    prepare_real_data(data, out, "tiny")
    src = data / "preference" / "preference.jsonl"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    capsys.readouterr()
    prepare_real_data(data, out, "tiny")
    said = capsys.readouterr().out
    assert "data: preference already split" not in said and "data: sft already split" in said

    plan = {**pipeline.REAL_SPLIT["tiny"], "budget": {**pipeline.REAL_SPLIT["tiny"]["budget"], "sft": 50_000}}
    monkeypatch.setitem(pipeline.REAL_SPLIT, "tiny", plan)
    rep = prepare_real_data(data, out, "tiny")
    said = capsys.readouterr().out
    assert "data: sft already split" not in said and "budget" in said
    assert rep["sft"]["keep_share"] < 1


def test_missing_data_dir_is_an_error_not_a_stale_split(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_real_data(_corpora(tmp_path / "corpora"), out, "tiny")
    with pytest.raises(PipelineError, match="no pretrain corpus in .*nowhere/pretrain/\\*.jsonl"):
        prepare_real_data(tmp_path / "nowhere", out, "tiny")


def test_split_json_without_sources_is_split_again(tmp_path: Path, capsys) -> None:
    """A split.json written before the split recorded its sources (only records and shares) is not trusted."""
    data, out = _corpora(tmp_path / "corpora"), tmp_path / "out"
    prepare_real_data(data, out, "tiny")
    for role in ROLES:
        path = out / "data_tiny" / role / "split.json"
        old = json.loads(path.read_text())
        keep = ("sources", "keep_share", "val_share", "test_share", "read_bytes", "records", "bytes")
        path.write_text(json.dumps({k: old[k] for k in keep}))
    capsys.readouterr()
    rep = prepare_real_data(data, out, "tiny")
    said = capsys.readouterr().out
    assert "already split" not in said and said.count("re-splitting") == 3
    capsys.readouterr()
    assert prepare_real_data(data, out, "tiny") == rep
    assert capsys.readouterr().out.count("already split") == 3


def test_resplit_names_finished_stages_trained_on_the_old_split(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    prepare_real_data(_corpora(tmp_path / "a"), out, "tiny")
    (out / "pretrain_tiny").mkdir()
    (out / "pretrain_tiny" / "DONE.json").write_text("{}")
    capsys.readouterr()
    prepare_real_data(_corpora(tmp_path / "b [copy]", lines=30), out, "tiny")  # glob characters in the folder name
    said = capsys.readouterr().out
    assert "finished stages (pretrain_tiny) were trained on the earlier split" in said
    assert sum(_records(out)["sft"].values()) == 30


# ---- max_steps / val_check_interval per stage ----


def _fit_args(tmp_path: Path, monkeypatch, stage_name: str, max_steps: int | None, edit=None) -> dict[str, str]:
    """The `--trainer.*` overrides `minillm pipeline [--max_steps N]` gives `minillm fit` for one sample-recipe
    stage (its predecessors already done, nothing trains)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    src = ROOT / "configs" / f"{stage_name}_tiny.yaml"
    cfg = yaml.safe_load(src.read_text())
    if edit:
        edit(cfg)
    (tmp_path / "configs" / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    needs, todo = set(), [stage_name]
    while todo:
        name = todo.pop()
        for need in next(s for s in STAGES if s.name == name).needs:
            needs.add(need)
            todo.append(need)
    for need in needs:  # finished earlier: skipped, their checkpoints handed on
        (tmp_path / "out" / f"{need}_tiny").mkdir(parents=True)
        done = {"stage": need, "checkpoint": f"out/{need}_tiny/best.ckpt", "wall_s": 1.0, "scalars": {}}
        (tmp_path / "out" / f"{need}_tiny" / "DONE.json").write_text(json.dumps(done))
    calls: list[list[str]] = []

    def fake_run(cmd, what, best, output):
        calls.append(cmd)
        (output / f"{stage_name}_tiny").mkdir(parents=True, exist_ok=True)
        (output / f"{stage_name}_tiny" / "last.ckpt").write_bytes(b"")
        return 0.0

    monkeypatch.setattr(pipeline, "_run", fake_run)
    monkeypatch.setattr(pipeline, "final_scalars", lambda run_dir: {})
    monkeypatch.setattr(pipeline_report, "report", lambda *a, **k: "")
    argv = ["--output", "out", "--stages", ",".join([*needs, stage_name])]
    pipeline.pipeline_main(argv + ([f"--max_steps={max_steps}"] if max_steps else []))
    (fit,) = calls
    return dict(a.removeprefix("--trainer.").split("=", 1) for a in fit if a.startswith("--trainer."))


@pytest.mark.parametrize(("max_steps", "rollouts"), [(4, 1), (2, 1), (8, 2), (10, 3), (800, 200)])
def test_ppo_validates_at_the_end_of_a_shortened_run(tmp_path: Path, monkeypatch, max_steps, rollouts) -> None:
    """PPO's max_steps counts optimizer updates (ppo_epochs x num_mini_batches = 4 per rollout in ppo_tiny),
    its val_check_interval counts rollouts: the last rollout of the run must validate."""
    args = _fit_args(tmp_path, monkeypatch, "ppo", max_steps)
    assert args["max_steps"] == str(max_steps)
    assert args["val_check_interval"] == str(rollouts)


def test_ppo_updates_per_rollout_come_from_the_config_run(tmp_path: Path, monkeypatch) -> None:
    def grpo(cfg):
        cfg["model"]["init_args"].update(advantage="grpo", group_size=4, ppo_epochs=3, num_mini_batches=1)

    assert _fit_args(tmp_path, monkeypatch, "ppo", 7, grpo)["val_check_interval"] == "3"  # ceil(7 / 3)

    def defaults(cfg):  # not in the config: PPOModule's defaults (2 x 2)
        del cfg["model"]["init_args"]["ppo_epochs"], cfg["model"]["init_args"]["num_mini_batches"]

    assert _fit_args(tmp_path / "d", monkeypatch, "ppo", 8, defaults)["val_check_interval"] == "2"


def test_other_stages_validate_at_max_steps_counting_accumulated_batches(tmp_path: Path, monkeypatch) -> None:
    assert _fit_args(tmp_path / "a", monkeypatch, "sft", 5) | {} == {
        "enable_progress_bar": "false",
        "max_steps": "5",
        "val_check_interval": "5",
    }

    def accumulate(cfg):
        cfg["trainer"]["accumulate_grad_batches"] = 4

    # 3 optimizer steps of 4 batches each: val_check_interval counts batches
    assert _fit_args(tmp_path / "b", monkeypatch, "pretrain", 3, accumulate)["val_check_interval"] == "12"


def test_without_max_steps_the_config_is_left_alone_unless_it_never_validates(tmp_path: Path, monkeypatch) -> None:
    assert "val_check_interval" not in _fit_args(tmp_path / "a", monkeypatch, "ppo", None)  # 200 rollouts, every 50

    def never(cfg):  # 80 updates = 20 rollouts, validating every 40 rollouts would never happen
        cfg["trainer"].update(max_steps=80, val_check_interval=40)

    args = _fit_args(tmp_path / "b", monkeypatch, "ppo", None, never)
    assert args["val_check_interval"] == "20" and "max_steps" not in args
