"""Zero-shot evaluation of a MiniGPT on standard benchmarks, scored the way lm-evaluation-harness scores them.

Three kinds of task:

* **perplexity** (WikiText-2, any text file): each document is scored with rolling windows of ``block_size``
  tokens advancing by ``stride``; every token is predicted once, with at least ``block_size - stride`` tokens of
  context once the document is longer than a window. Reported: token perplexity (tokenizer-dependent),
  word perplexity (WikiText only, words of the original tokenized text as in lm-eval) and bits per byte
  ``= total NLL (nats) / ln 2 / UTF-8 bytes``, which compares models with different tokenizers.
* **multiple choice** (HellaSwag, ARC, PIQA, WinoGrande, BoolQ): the log-likelihood of each choice given its
  context; ``acc`` picks the highest sum, ``acc_norm`` the highest sum divided by the choice's UTF-8 byte length
  (lm-eval divides by the character count, identical on these ASCII data sets).
* **LAMBADA**: the last word given the passage; ``acc`` counts passages whose every target token is the greedy
  (argmax) prediction, ``ppl`` is ``exp(-mean log p(last word))``.

Every context starts with ``</s>``, the token that precedes each document in the packed pretraining stream
(lm-eval's models prepend their BOS token the same way). Prompt formats follow lm-eval 0.4 task configs.
The loaders read local copies of the upstream files listed in :data:`DOWNLOADS` and convert them.


Layout: ``tasks.py`` (documents, loaders, the task table, downloads), ``scorer.py`` (log-likelihoods, rolling
perplexity, metrics, running tasks), ``harness.py`` (the optional lm-evaluation-harness adapter).
"""

from minillm_lightning.eval.harness import harness_lm
from minillm_lightning.eval.scorer import LogLikelihoodScorer, evaluate_docs, results_table, run_tasks
from minillm_lightning.eval.tasks import TASKS, TaskSpec, load_task

__all__ = [
    "TASKS",
    "LogLikelihoodScorer",
    "TaskSpec",
    "evaluate_docs",
    "harness_lm",
    "load_task",
    "results_table",
    "run_tasks",
]
