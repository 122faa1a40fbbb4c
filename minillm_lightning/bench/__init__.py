"""`minillm bench`: speed and memory measurements, one module per section.

args.py (the command's options; parsed before anything heavy is imported), main.py (the train/loop/decode/data
sections and the tables), dpo.py (DPO step against SFT),
eval.py (scored tokens/s), profile.py (per-op profile of a training step), nanogpt.py (nanoGPT's recipe side
by side), serve.py (concurrent clients against `minillm serve`).
"""
