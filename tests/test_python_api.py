"""The library used from Python with a plain ``lightning.Trainer`` (no ``minillm`` command): what a notebook or a
script meets that the CLI never shows."""

from __future__ import annotations

import inspect
import warnings

import pytest
from conftest import MICRO_ARCH, SAMPLE, micro_trainer

import minillm_lightning
from minillm_lightning import (
    ContainsReward,
    DPOModule,
    GenerationConfig,
    MiniGPT,
    MiniGPTConfig,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
    TextGenerator,
    Tokenizer,
    export_hf,
)
from minillm_lightning.checkpoint import load_checkpoint
from minillm_lightning.errors import ConfigError
from minillm_lightning.rewards import load_reward_function


def test_every_shipped_callback_is_a_top_level_name():
    """The callbacks the docs list (LineProgress, and CompletionWriter of `minillm predict`) import from the package
    like the others."""
    from minillm_lightning import callbacks

    for name in callbacks.__all__:
        if name[0].isupper():
            assert getattr(minillm_lightning, name) is getattr(callbacks, name), name
            assert name in minillm_lightning.__all__


class CountingReward(ContainsReward):
    def __init__(self) -> None:
        super().__init__("equals")
        self.calls = 0

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.calls += 1
        return super().__call__(prompts, responses)


def test_ppo_takes_reward_function_objects(tmp_path, tiny_pretrain_ckpt):
    """reward_fn / eval_reward_fn given as Python objects (an instance, a lambda) are used as they are; the checkpoint
    records their class paths and stays readable with weights_only (TextGenerator, init_from)."""
    ckpt = str(tiny_pretrain_ckpt)
    dm = PromptDataModule([str(SAMPLE / "prompts.jsonl")], tokenizer=ckpt, batch_size=4, max_length=64)
    reward = CountingReward()
    model = PPOModule(
        init_from=ckpt,
        reward_fn=reward,
        eval_reward_fn=lambda prompts, responses: [0.5] * len(responses),
        max_new_tokens=8,
        ppo_epochs=1,
        num_mini_batches=1,
        missing_eos_penalty=0.0,
    )
    trainer = micro_trainer(tmp_path, max_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(model, datamodule=dm)
    assert reward.calls >= 1 and trainer.callback_metrics["val/eval_reward_mean"] == 0.5
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    hp = load_checkpoint(tmp_path / "ppo.ckpt")["hyper_parameters"]
    assert hp["reward_fn"] == f"{__name__}.CountingReward"
    assert hp["eval_reward_fn"].endswith("<lambda>")
    assert TextGenerator.from_checkpoint(tmp_path / "ppo.ckpt").meta["stage"] == "ppo"
    # a class is instantiated without arguments
    assert isinstance(load_reward_function(CountingReward), CountingReward)


def test_tokenizer_from_checkpoint_takes_a_path(tiny_pretrain_ckpt):
    from_dict = Tokenizer.from_checkpoint(load_checkpoint(tiny_pretrain_ckpt))
    assert Tokenizer.from_checkpoint(tiny_pretrain_ckpt).sha256 == from_dict.sha256
    assert Tokenizer.from_checkpoint(str(tiny_pretrain_ckpt)).sha256 == from_dict.sha256


def test_text_where_token_ids_belong_is_refused(tiny_pretrain_ckpt):
    """A bare string to generate_text would be read as one prompt per character; to generate/stream_text (token
    ids) it failed in torch ("too many dimensions 'str'")."""
    gen = TextGenerator(MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=1024)), Tokenizer.from_file(tiny_pretrain_ckpt))
    cfg = GenerationConfig(max_new_tokens=2, temperature=0)
    with pytest.raises(TypeError, match=r"pass \[text\]"):
        gen.generate_text("What is 2 plus 2?", cfg)
    with pytest.raises(TypeError, match="generate_text"):
        gen.generate(["What is 2 plus 2?"], cfg)
    with pytest.raises(TypeError, match="encode_prompt"):
        list(gen.stream_text("What is 2 plus 2?", cfg))
    assert len(gen.generate_text(["What is 2 plus 2?"], cfg)) == 1


@pytest.mark.parametrize(
    ("stage", "data", "wanted"),
    [
        (DPOModule, lambda ckpt: SFTDataModule([str(SAMPLE / "sft.jsonl")], tokenizer=ckpt, max_length=64), "Prefer"),
        (SFTModule, lambda ckpt: PromptDataModule([str(SAMPLE / "prompts.jsonl")], tokenizer=ckpt), "SFTDataModule"),
    ],
)
def test_a_stage_refuses_another_stages_data_module(tmp_path, tiny_pretrain_ckpt, stage, data, wanted):
    """It failed in the first step with a raw KeyError ('chosen_input_ids', 'input_ids', 'prompt_ids')."""
    ckpt = str(tiny_pretrain_ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dpo normally starts from the SFT model"
        model = stage(init_from=ckpt)
    with pytest.raises(ConfigError, match=f"reads the batches of .*{wanted}"):
        micro_trainer(tmp_path, max_steps=1).fit(model, datamodule=data(ckpt))


def test_preference_stages_do_not_warn_about_their_own_batch_hook(tmp_path, tiny_pretrain_ckpt):
    """Lightning's "You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a
    `LightningDataModule`" came with every reward/DPO run: the module's hook marking the padding is meant."""
    from lightning.pytorch.trainer.connectors import data_connector

    data_connector.warning_cache.clear()  # Lightning warns once per process
    ckpt = str(tiny_pretrain_ckpt)
    dm = PreferenceDataModule([str(SAMPLE / "preference.jsonl")], tokenizer=ckpt, max_length=64, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = RewardModule(init_from=ckpt)
        micro_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert not [w for w in caught if "on_before_batch_transfer" in str(w.message)]


def test_export_hf_documents_every_argument():
    """``stage`` decides the exported eos_token: a chat model exported with the default gets ``</s>``."""
    doc = inspect.getdoc(export_hf)
    for name in inspect.signature(export_hf).parameters:
        assert f"{name}:" in doc, name
