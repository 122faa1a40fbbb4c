"""``minillm eval``: the loaders on the local benchmark copies, the scoring rules on crafted cases (stub models whose
log-likelihoods are known by construction) and the command on the tiny checkpoint."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FIXTURES, real_data_path
from torch import nn

from minillm_lightning.checkpoint import load_backbone
from minillm_lightning.cli import main
from minillm_lightning.errors import DataError
from minillm_lightning.eval import harness as ev_harness
from minillm_lightning.eval import scorer as ev_scorer
from minillm_lightning.eval import tasks as ev_tasks
from minillm_lightning.tokenizer import Tokenizer

# the first 3 LAMBADA and HellaSwag items (tests/fixtures/README.md); the full sets are opt-in real data
EVAL_FIXTURE = FIXTURES / "eval"


@pytest.fixture
def eval_data() -> Path:
    """The real evaluation sets under ``$MINILLM_TEST_DATA/eval`` (the test skips, saying why, without them)."""
    return real_data_path("eval")


class UnigramStub(nn.Module):
    """A context-free "language model": every position predicts softmax(``logits``)."""

    def __init__(self, logits: torch.Tensor, block_size: int = 32) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.float())
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(*idx.shape, -1))


@pytest.fixture(scope="module")
def tiny(tiny_pretrain_ckpt: Path) -> tuple[nn.Module, Tokenizer]:
    model, ckpt = load_backbone(tiny_pretrain_ckpt)
    return model, Tokenizer.from_checkpoint(ckpt)


# ---- loaders: counts and fields of the local files


def test_loaders_parse_local_files(eval_data: Path) -> None:
    wiki = ev_tasks.load_wikitext2(eval_data)
    assert len(wiki) == 62 and wiki[0].text.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, ")
    assert wiki[1].text.startswith(" = Du Fu =\n") and "guest-starring" in wiki[0].text
    assert sum(d.words for d in wiki) == 241_211  # WikiText-2 test: 245,569 tokens = these words + 4,358 <eos>
    lambada = ev_tasks.load_lambada(eval_data)
    assert len(lambada) == 5153 and lambada[0].target == " signs" and not lambada[0].context.endswith(" ")

    hella = ev_tasks.load_hellaswag(eval_data)
    assert len(hella) == 1000 and all(len(d.continuations) == 4 for d in hella)
    assert hella[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella[0].gold == 3 and hella[0].continuations[3] == " starts pulling up roofing on a roof."

    piqa = ev_tasks.load_piqa(eval_data)
    assert len(piqa) == 1838 and piqa[0].contexts[0].startswith("Question: How do I ready a guinea pig cage")
    assert piqa[0].contexts[0].endswith("\nAnswer:") and [d.gold for d in piqa[:4]] == [0, 1, 1, 1]

    easy, challenge = ev_tasks.load_arc_easy(eval_data), ev_tasks.load_arc_challenge(eval_data)
    assert (len(easy), len(challenge)) == (2376, 1172)
    assert easy[0].contexts[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert (
        easy[0].continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and easy[0].gold == 0
    )
    assert {len(d.continuations) for d in easy + challenge} == {3, 4, 5}
    assert all(0 <= d.gold < len(d.continuations) for d in easy + challenge)

    wino = ev_tasks.load_winogrande(eval_data)
    assert len(wino) == 1267 and wino[0].contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wino[0].continuations == [" always got the easier cases."] * 2 and wino[0].gold == 1

    boolq = ev_tasks.load_boolq(eval_data)
    assert len(boolq) == 32 and boolq[0].continuations == [" no", " yes"] and boolq[0].gold == 0
    assert boolq[0].contexts[0].endswith("\nQuestion: is ghost in the shell based on the anime?\nAnswer:")


def test_hellaswag_ctx_split_and_preprocess() -> None:
    assert ev_tasks._split_hellaswag_ctx("A lady walks. She bends down. the lady") == (
        "A lady walks. She bends down.",
        "the lady",
    )
    assert ev_tasks._split_hellaswag_ctx("No fragment here. The end") == ("No fragment here. The end", "")
    assert ev_tasks._hellaswag_preprocess(" Tie a knot [title] Pull it  [step]tight") == "Tie a knot. Pull it tight"


def test_missing_file_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"lambada_test.jsonl is missing \(--no-download\).*openaipublic"):
        ev_tasks.ensure_files("lambada", tmp_path, download=False)

    class FakeResponse:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self) -> bytes:
            return b'{"text": "the cat sat on the mat"}\n'

    monkeypatch.setattr(ev_tasks.urllib.request, "urlopen", lambda url, timeout: FakeResponse())
    ev_tasks.ensure_files("lambada", tmp_path, download=True)
    assert ev_tasks.load_lambada(tmp_path)[0].target == " mat"


# ---- scoring rules on crafted cases


def test_correct_choice_with_higher_likelihood_scores_acc_1(tiny) -> None:
    _, tok = tiny
    logits = torch.zeros(tok.vocab_size)
    logits[tok.encode(" yes")] = 5.0  # the stub prefers the tokens of " yes" everywhere
    scorer = ev_scorer.LogLikelihoodScorer(UnigramStub(logits), tok, batch_size=3)
    docs = [
        ev_tasks._choice(f"Question: is {q} true?\nAnswer:", ["yes", "no"], 0) for q in ("sky", "grass", "fire", "x")
    ]
    assert ev_scorer.evaluate_docs(scorer, "choice", docs)["acc"] == 1.0
    docs[1].gold = 1
    assert ev_scorer.evaluate_docs(scorer, "choice", docs)["acc"] == 0.75


def test_acc_norm_differs_from_acc_on_length() -> None:
    doc = ev_tasks.ChoiceDoc(["q"] * 2, [" a", " abcdef"], gold=1, norm_lengths=[1, 6])
    m = ev_scorer.choice_metrics([doc], [[-2.0, -6.0]], acc_norm=True)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0  # -2/1 < -6/6


def test_acc_norm_end_to_end_with_uniform_model(tiny) -> None:
    _, tok = tiny
    scorer = ev_scorer.LogLikelihoodScorer(UnigramStub(torch.zeros(tok.vocab_size)), tok)
    long = "the the the the the the"  # several bytes per token: a higher log-likelihood per byte
    doc = ev_tasks._choice("Question: q\nAnswer:", ["x", long], gold=1)
    assert len(tok.encode(" " + long)) < len(long.encode())
    m = ev_scorer.evaluate_docs(scorer, "choice", [doc], acc_norm=True)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0


def test_bits_per_byte_by_hand(tiny) -> None:
    """Uniform model over V tokens: every token costs ln V nats, so bpb = n_tokens * ln V / ln 2 / n_bytes."""
    _, tok = tiny
    text = "Hello wörld, 你好!"
    scorer = ev_scorer.LogLikelihoodScorer(UnigramStub(torch.zeros(tok.vocab_size)), tok)
    m = ev_scorer.evaluate_docs(scorer, "perplexity", [ev_tasks.TextDoc(text)])
    n_tokens, n_bytes = len(tok.encode(text)), len(text.encode("utf-8"))
    assert m["tokens"] == n_tokens and m["bytes"] == n_bytes == 21
    assert m["bits_per_byte"] == pytest.approx(n_tokens * math.log(tok.vocab_size) / math.log(2) / n_bytes)
    assert m["token_perplexity"] == pytest.approx(tok.vocab_size)


def test_rolling_perplexity_equals_full_window_when_text_fits(tiny) -> None:
    model, tok = tiny
    scorer = ev_scorer.LogLikelihoodScorer(model, tok)
    ids = [tok.eos_id, *tok.encode("Let us practise adding. 0 plus 1 equals 1. The cat sat on the mat.")]
    assert len(ids) <= model.config.block_size
    with torch.no_grad():
        x = torch.tensor([ids])
        full = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:], reduction="sum")
    (nll, n), *_ = scorer.rolling_nll([ids], stride=7)
    assert n == len(ids) - 1 and nll == pytest.approx(float(full), rel=1e-5)
    # a document longer than the window: every token scored once, more context never hurts much
    long = ids + ids[1:] * 4
    (nll_long, n_long), *_ = scorer.rolling_nll([long], stride=32)
    assert n_long == len(long) - 1 and math.isfinite(nll_long)


def test_lambada_greedy_accuracy(tiny) -> None:
    _, tok = tiny
    word = next(w for w in (" the", " a", " is", " plus", " cat") if len(tok.encode(w)) == 1)
    target = tok.encode(word)
    logits = torch.zeros(tok.vocab_size)
    logits[target] = 10.0  # this one-token word is every position's argmax
    scorer = ev_scorer.LogLikelihoodScorer(UnigramStub(logits), tok)
    docs = [ev_tasks.LambadaDoc("he sat on", word), ev_tasks.LambadaDoc("he sat on the", " mat")]
    m = ev_scorer.evaluate_docs(scorer, "lambada", docs)
    assert m["acc"] == 0.5
    lp_the = float(torch.log_softmax(logits, -1)[target[0]])
    lp_mat = sum(float(torch.log_softmax(logits, -1)[t]) for t in tok.encode(" mat"))
    assert m["ppl"] == pytest.approx(math.exp(-(lp_the + lp_mat) / 2))


def test_encode_pair_moves_trailing_space(tiny) -> None:
    _, tok = tiny
    scorer = ev_scorer.LogLikelihoodScorer(UnigramStub(torch.zeros(tok.vocab_size)), tok)
    ctx, cont = scorer.encode_pair("Answer: ", "yes")
    assert ctx == [tok.eos_id, *tok.encode("Answer:")] and tok.decode(cont) == " yes"


# ---- the command


def test_eval_command_writes_json_next_to_checkpoint(tiny_pretrain_ckpt: Path, eval_data: Path, capsys) -> None:
    main(
        ["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--limit", "2", "--no-download", "--batch-size", "8"]
        + ["--data-dir", str(eval_data)]
    )
    out = capsys.readouterr().out
    assert "| hellaswag | acc_norm |" in out and "| wikitext2 | bits_per_byte |" in out
    files = sorted(tiny_pretrain_ckpt.parent.glob(f"eval_{tiny_pretrain_ckpt.stem}_*.json"))
    assert files, "no results JSON next to the checkpoint"
    report = json.loads(files[-1].read_text())
    assert set(report["results"]) == set(ev_tasks.TASKS) and report["stage"] == "pretrain"
    assert report["results"]["hellaswag"]["n"] == 2 and report["results"]["hellaswag"]["n_total"] == 1000
    assert 0 < report["results"]["wikitext2"]["bits_per_byte"] < 100
    assert report["settings"]["limit"] == 2 and report["timestamp"]


def test_eval_command_on_committed_fixture(tiny_pretrain_ckpt: Path, tmp_path: Path, capsys) -> None:
    """The command end to end without network or real data: two tasks from the 3-item fixture copies (one named
    twice, which is scored and printed once)."""
    out = tmp_path / "r.json"
    tasks = "lambada,hellaswag,lambada"
    args = ["--tasks", tasks, "--data-dir", str(EVAL_FIXTURE), "--no-download", "--output", str(out)]
    main(["eval", "--checkpoint", str(tiny_pretrain_ckpt), *args])
    printed = capsys.readouterr().out
    assert "| hellaswag | acc_norm |" in printed and printed.count("| lambada | acc |") == 1
    report = json.loads(out.read_text())
    assert report["settings"]["data_dir"] == str(EVAL_FIXTURE.resolve())
    assert report["results"]["lambada"]["n"] == 3 and report["results"]["hellaswag"]["n"] == 3
    assert 0 <= report["results"]["hellaswag"]["acc"] <= 1 and report["results"]["lambada"]["ppl"] > 1


def test_eval_defaults_to_data_eval_and_names_a_missing_file(
    tiny_pretrain_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """Offline, a missing task file is one line naming the file (under the default data/eval) and its URL."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--tasks", "piqa", "--no-download"])
    err = capfd.readouterr().err.strip()
    assert exc.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 2  # "evaluating ..." + error
    line = err.splitlines()[-1]
    assert line.startswith("error: task piqa: data/eval/piqa/valid.jsonl is missing") and "https://" in line

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # downloading allowed, but no network
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--tasks", "lambada"])
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and line.startswith("error: task lambada: data/eval/lambada/lambada_test.jsonl")
    assert f"is missing and downloading {ev_tasks.DOWNLOADS['lambada/lambada_test.jsonl']} failed" in line


def test_eval_command_errors(tiny_pretrain_ckpt: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--tasks", "mmlu"])
    assert "unknown task(s) mmlu" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("The cat sat on the mat. " * 20)
    out = tmp_path / "r.json"
    main(["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--tasks", "", "--text", str(text), "--output", str(out)])
    assert json.loads(out.read_text())["results"][f"text:{text}"]["bytes"] == len(text.read_bytes())


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--batch-size", "-2", "error: --batch-size must be >= 1, got -2"),
        ("--batch_size", "0", "error: --batch-size must be >= 1, got 0"),
        ("--stride", "0", "error: --stride must be >= 1"),
        ("--stride", "-5", "error: --stride must be >= 1"),
        ("--stride", "100000", "error: --stride 100000 exceeds the model's context block_size="),
    ],
)
def test_eval_refuses_bad_batch_size_and_stride(
    tiny_pretrain_ckpt: Path, tmp_path: Path, capfd, option: str, value: str, message: str
) -> None:
    """A negative batch size used to score nothing and report a perfect perplexity of 1; a zero one or an out-of-range
    stride ended in a traceback, and --stride 0 silently meant the default. Now each is one line and exit code 2,
    before anything is scored or written."""
    text = tmp_path / "notes.txt"
    text.write_text("The cat sat on the mat. " * 20)
    out = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--tasks", "", "--text", str(text), "--output", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, option, value])
    err = capfd.readouterr().err.strip()
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(message), err
    assert not out.exists()


def test_harness_adapter(tiny) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    model, tok = tiny
    lm = ev_harness.harness_lm(ev_scorer.LogLikelihoodScorer(model, tok))
    req = Instance("loglikelihood", {}, ("Question: 1 plus 1 equals", " 2"), 0)
    (ll, greedy), *_ = lm.loglikelihood([req])
    assert ll < 0 and isinstance(greedy, bool)
    rolling = Instance("loglikelihood_rolling", {}, ("The cat sat on the mat.",), 0)
    assert lm.loglikelihood_rolling([rolling])[0] < 0
    gen = Instance("generate_until", {}, ("Let us practise adding.", {"until": ["."], "max_gen_toks": 8}), 0)
    assert "." not in lm.generate_until([gen])[0]


def test_harness_rolling_scores_lm_evals_own_windows(tiny) -> None:
    """--harness perplexity uses the windows lm-eval's Hugging Face backend scores (``get_rolling_token_windows``
    with ``context_len=1``, each window fed whole): reference built from lm-eval's functions, window by window."""
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    from lm_eval.api.instance import Instance

    model, tok = tiny
    block = model.config.block_size
    text = "The cat sat on the mat and looked at the dog. " * 40
    tokens = tok.encode(text)
    assert len(tokens) > 2 * block  # several windows, the last one partly new
    expected = 0.0
    for pair in lm_eval_utils.get_rolling_token_windows(tokens, tok.eos_id, block, 1):
        context, cont = lm_eval_utils.make_disjoint_window(pair)
        fed = torch.tensor([(context + cont)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(fed).logits[0, -len(cont) :].double(), -1)
        expected += float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
    scorer = ev_scorer.LogLikelihoodScorer(model, tok)
    (got,) = ev_harness.harness_lm(scorer).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(expected, rel=1e-5)
    # the built-in default (half-window stride) keeps more context: a different number, which lm-eval never gives
    (half_nll, _), *_ = scorer.rolling_nll([[tok.eos_id, *tokens]])
    assert abs(-half_nll - expected) > 1e-3 * abs(expected)
