"""``minillm export``: the Hugging Face directory loads with plain ``transformers`` (no custom code) and reproduces
our model (fp32 logits, greedy generations) and our tokenizer (ids on English, Chinese, code, special tokens, chat)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, MICRO_ARCH

from minillm_lightning.checkpoint import META_KEY, load_backbone
from minillm_lightning.cli import main
from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.hf_export import export_checkpoint, export_hf
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.tokenizer import Tokenizer, TokenizerSettings, train_sentencepiece

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, double  spaces\tand tabs\n\nnew lines ",
    "中文测试：今天天气很好，我们去公园散步吧。",
    "def add(a: int, b: int) -> int:\n    return a + b  # 42 == 0x2A\n",
    "emoji 😀 and accents: café, naïve, Ünïcödé",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "12345 67.89 -0.5e10",
    "",
]


def save_checkpoint(path: Path, model: MiniGPT, tokenizer: Tokenizer, stage: str = "pretrain") -> Path:
    """A minimal minillm checkpoint (what the stages save, minus the trainer state)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"stage": stage, "arch": model.config.to_dict(), "format": 1}
    torch.save({"state_dict": state, META_KEY: meta, "tokenizer": tokenizer.state()}, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_pretrain_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_file(tiny_pretrain_ckpt)


@pytest.fixture(scope="module")
def checkpoints(tiny_pretrain_ckpt: Path, tokenizer: Tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The trained micro checkpoint, and random micro models: MoE (Mixtral) and untied embeddings (chat stage)."""
    root = tmp_path_factory.mktemp("export_ckpts")
    torch.manual_seed(0)
    # init_std 0.1: peaked logits, so greedy decoding never hinges on float-rounding ties between implementations
    moe = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=tokenizer.vocab_size, n_experts=4, top_k=2, init_std=0.1))
    untied = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=tokenizer.vocab_size, tie_embeddings=False, init_std=0.1))
    return {
        "dense": tiny_pretrain_ckpt,
        "moe": save_checkpoint(root / "moe.ckpt", moe, tokenizer),
        "untied": save_checkpoint(root / "untied.ckpt", untied, tokenizer, stage="sft"),
    }


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    return {name: export_checkpoint(path, root / name) for name, path in checkpoints.items()}


def test_directory_layout_and_config(exported: dict[str, Path]) -> None:
    from safetensors import safe_open

    names = {p.name for p in exported["dense"].iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= names
    cfg = json.loads((exported["dense"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert "auto_map" not in cfg  # nothing needs trust_remote_code
    with safe_open(exported["dense"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: Hugging Face re-ties it
    with safe_open(exported["untied"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
    moe_cfg = json.loads((exported["moe"] / "config.json").read_text())
    assert moe_cfg["architectures"] == ["MixtralForCausalLM"] and moe_cfg["num_local_experts"] == 4
    gen = json.loads((exported["dense"] / "generation_config.json").read_text())
    tok_cfg = json.loads((exported["untied"] / "tokenizer_config.json").read_text())
    assert gen["eos_token_id"] == [5, 3] and tok_cfg["eos_token"] == "<|im_end|>"  # an SFT checkpoint ends turns


@pytest.mark.parametrize("name", ["dense", "moe", "untied"])
def test_transformers_reproduces_logits_and_greedy_generation(
    name: str, checkpoints: dict[str, Path], exported: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    ours, _ = load_backbone(checkpoints[name])
    hf = AutoModelForCausalLM.from_pretrained(exported[name]).eval()  # no trust_remote_code
    assert type(hf).__name__ == ("MixtralForCausalLM" if name == "moe" else "LlamaForCausalLM")
    idx = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx).logits, rtol=1e-4, atol=1e-4)

    tok = Tokenizer.from_file(checkpoints[name])
    prompt = [tok.eos_id, *tok.encode("Let us practise adding. 0 plus")]
    mine = TextGenerator(ours, tok).generate([prompt], GenerationConfig(max_new_tokens=20, temperature=0.0))[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, attention_mask=None)
    theirs = out[0, len(prompt) :].tolist()
    stops = {tok.im_end_id, tok.eos_id}
    cut = next((i + 1 for i, t in enumerate(theirs) if t in stops), len(theirs))  # HF pads after its eos
    assert theirs[:cut] == mine


def test_tokenizer_ids_match_ours(exported: dict[str, Path], tokenizer: Tokenizer) -> None:
    from tokenizers import Tokenizer as FastTokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported["dense"])  # no trust_remote_code
    fast = FastTokenizer.from_file(str(exported["dense"] / "tokenizer.json"))  # what vLLM & co. read
    texts = TEXTS + [
        json.loads(line)["text"] for line in (Path(__file__).parents[1] / "data/sample/pretrain.jsonl").open()
    ]
    for text in texts:
        ours = [tokenizer.eos_id, *tokenizer.encode(text)]  # plain prompts start after </s>, like generate's
        assert hf(text).input_ids == ours, text
        assert fast.encode(text).ids == ours, text
        assert hf.decode(ours, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4\nDone."},
        {"role": "user", "content": "你好"},
    ]
    for gen_prompt in (False, True):
        ids = hf.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True, return_dict=True)
        assert ids["input_ids"] == tokenizer.encode_chat(messages, add_generation_prompt=gen_prompt)[0]
        rendered = hf.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
        assert rendered == tokenizer.render_chat(messages, add_generation_prompt=gen_prompt)


def test_char_tokenizer_export(tmp_path: Path) -> None:
    """Llama tokenizers are BPE; char (and unigram) SentencePiece models get a Unigram tokenizer.json."""
    from transformers import AutoTokenizer

    # real English, Chinese, emoji and code text: ~670 distinct characters, each one token
    texts = [json.loads(line)["text"] for line in (FIXTURES / "tokenizer_corpus.jsonl").open(encoding="utf-8")]
    tok = Tokenizer(
        train_sentencepiece(texts, TokenizerSettings(vocab_size=800, model_type="char", character_coverage=1))
    )
    model = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=tok.vocab_size))
    hf = AutoTokenizer.from_pretrained(export_hf(model, tok, tmp_path / "char"))
    for sample in ["First Citizen:\nBefore we proceed any further, hear me speak.", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert hf(sample).input_ids == [tok.eos_id, *tok.encode(sample)]


def test_export_command(tiny_pretrain_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(tiny_pretrain_ckpt), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "tokenizer ids equal" in printed
    with pytest.raises(SystemExit):  # refuses to mix files into a non-empty directory
        main(["export", "--checkpoint", str(tiny_pretrain_ckpt), "--output", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    main(
        ["export", "--checkpoint", str(tiny_pretrain_ckpt), "--output", str(out), "--overwrite", "--dtype", "bfloat16"]
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_overwrite_keeps_what_must_survive(tiny_pretrain_ckpt: Path, tmp_path: Path) -> None:
    """``--overwrite`` deleted the output directory before reading the checkpoint: a damaged checkpoint cost the
    earlier export, and an output holding the checkpoint itself (a run directory) lost the checkpoint."""
    out = export_checkpoint(tiny_pretrain_ckpt, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(tiny_pretrain_ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        export_checkpoint(bad, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    run = tmp_path / "run"
    run.mkdir()
    inside = run / "last.ckpt"
    inside.write_bytes(tiny_pretrain_ckpt.read_bytes())
    with pytest.raises(MiniLLMError, match=r"holds the checkpoint .*last.ckpt; --overwrite would delete it"):
        export_checkpoint(inside, run, overwrite=True)
    with pytest.raises(MiniLLMError, match=r"holds checkpoints \(last.ckpt\), not an earlier export"):
        export_checkpoint(tiny_pretrain_ckpt, run, overwrite=True)
    assert inside.read_bytes() == tiny_pretrain_ckpt.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_reward_checkpoint_warns_and_unwritable_output_is_one_line(tiny_pretrain_ckpt: Path, tmp_path: Path, capfd):
    """A reward model's scalar head was dropped without a word; an output path that cannot be created ended in a
    FileNotFoundError traceback."""
    from minillm_lightning.hf_export import export_checkpoint

    ckpt = torch.load(tiny_pretrain_ckpt, weights_only=False)
    ckpt[META_KEY] = {**ckpt[META_KEY], "stage": "reward"}
    reward = tmp_path / "reward.ckpt"
    torch.save(ckpt, reward)
    with pytest.warns(UserWarning, match=r"is a reward model: its scalar head .* is not exported"):
        export_checkpoint(reward, tmp_path / "hf")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(tiny_pretrain_ckpt), "--output", str(tmp_path / "afile" / "hf")])
    err = capfd.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: --output: cannot write in {tmp_path / 'afile' / 'hf'}")


def test_clear_errors(tiny_pretrain_ckpt: Path, tokenizer: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    shared = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=tokenizer.vocab_size, n_experts=2, n_shared_experts=1))
    with pytest.raises(MiniLLMError, match="shared experts"):
        export_hf(shared, tokenizer, tmp_path / "shared")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if the hf extra were not installed
    with pytest.raises(MiniLLMError, match=r"pip install 'minillm-lightning\[hf\]'"):
        export_checkpoint(tiny_pretrain_ckpt, tmp_path / "nohf")
