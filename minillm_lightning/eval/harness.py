"""An adapter that lets lm-evaluation-harness drive our scorer (optional: the ``eval`` extra)."""

from __future__ import annotations

from typing import Any

from minillm_lightning.errors import MiniLLMError
from minillm_lightning.eval.scorer import LogLikelihoodScorer

# ---------------------------------------------------------------- optional lm-evaluation-harness adapter


def harness_lm(scorer: LogLikelihoodScorer, max_gen_tokens: int = 256, stride: int | None = None) -> Any:
    """An ``lm_eval.api.model.LM`` backed by ``scorer`` (needs ``pip install 'lm_eval>=0.4.10,<0.5'``).

    Contexts start with ``</s>`` like the built-in tasks; ``generate_until`` decodes greedily with the KV cache
    and cuts at the first stop string. ``loglikelihood_rolling`` (WikiText and other perplexity tasks) advances
    its windows by ``stride``, by default ``block_size``: the windows lm-eval's own Hugging Face backend scores
    (``get_rolling_token_windows`` with ``context_len=1``), so the numbers compare with lm-eval's for any model.
    """
    rolling_stride = stride or scorer.block_size
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise MiniLLMError("--harness needs lm-evaluation-harness: pip install 'lm_eval>=0.4.10,<0.5'") from None
    from minillm_lightning.generation import GenerationConfig, TextGenerator

    class MiniLLMHarnessLM(LM):
        """lm-eval model interface over a MiniGPT: loglikelihood, loglikelihood_rolling, generate_until."""

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return scorer.loglikelihood([scorer.encode_pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            eos = scorer.tokenizer.eos_id
            docs = [[eos, *scorer.tokenizer.encode(r.args[0])] for r in requests]
            return [-nll for nll, _ in scorer.rolling_nll(docs, rolling_stride)]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            gen = TextGenerator(scorer.model, scorer.tokenizer)
            outputs = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                ids = [scorer.tokenizer.eos_id, *scorer.tokenizer.encode(context)]
                budget = min(int(kwargs.get("max_gen_toks", max_gen_tokens)), scorer.block_size - 1)
                ids = ids[-(scorer.block_size - budget) :]
                new = gen.generate([ids], GenerationConfig(max_new_tokens=budget, temperature=0.0))[0]
                text = scorer.tokenizer.decode([t for t in new if t not in gen.stop_tokens])
                for stop in until:
                    text = text.split(stop)[0]
                outputs.append(text)
            return outputs

    return MiniLLMHarnessLM()
