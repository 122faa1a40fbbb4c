"""`minillm bench`: speed and memory measurements, one module per section.

args.py (the command's options; parsed before anything heavy is imported), main.py (the train/loop/data sections,
running the configs and the tables), machine.py (matmul peak, datasheet peak, largest batch, timing), decode.py
(generation tokens/s), fitwall.py (a whole `minillm fit`'s wall clock), dpo.py (DPO step against SFT), eval.py
(scored tokens/s), profile.py (per-op profile of a training step), step.py (our step at nanoGPT's shape),
nanogpt.py (nanoGPT's recipe side by side), serve.py (concurrent clients against `minillm serve`).
"""
