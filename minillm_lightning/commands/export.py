"""``minillm export``: a checkpoint as a Hugging Face model directory (transformers, vLLM, llama.cpp's converter).

minillm export --checkpoint checkpoints/sft_tiny/last.ckpt --output hf/sft_tiny
"""

from __future__ import annotations

import sys

from minillm_lightning.commands import CommandParser
from minillm_lightning.errors import MiniLLMError
from minillm_lightning.hf_export import export_checkpoint, verify_export

VERIFY_TEXT = "Once upon a time, 3 cats wrote code: print('hi')\n你好，世界。"


def export_main(argv: list[str]) -> None:
    """``minillm export``: write the directory, then load it back with transformers and compare."""
    p = CommandParser(
        prog="minillm export",
        description="Export a checkpoint of any stage as a Hugging Face LlamaForCausalLM/MixtralForCausalLM "
        "directory that transformers loads without custom code.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.ckpt) of any stage; it carries its tokenizer")
    p.add_argument("--output", required=True, help="directory to write (created; must be empty unless --overwrite)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype of the saved weights"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    p.add_argument(
        "--no-verify", action="store_true", help="skip loading the result with transformers to compare logits"
    )
    args = p.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.output, args.dtype, args.overwrite)
    print(f"exported {args.checkpoint} to {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    if args.no_verify:
        return
    check = verify_export(args.checkpoint, out, VERIFY_TEXT)
    tolerance = 1e-3 if args.dtype == "float32" else 0.5
    print(
        f"verified with transformers: max |logit difference| {check['max_abs_logit_diff']:.2e}, "
        f"tokenizer ids {'equal' if check['tokenizer_ids_equal'] else 'DIFFERENT'}"
    )
    if check["max_abs_logit_diff"] > tolerance or not check["tokenizer_ids_equal"]:
        print("the exported model does not reproduce the checkpoint; please report this", file=sys.stderr)
        raise MiniLLMError(f"export verification failed: {check}")
