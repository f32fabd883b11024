"""transformers' batched `generate` on a HF checkpoint, the static-batch baseline for benchmarks/serve.py.

  /path/to/torch-venv/bin/python benchmarks/hf_generate.py --hf_dir DIR --prompts_json FILE [--batch 1 4 16 64]

Runs in a venv with torch and transformers (never a dependency of this project). Each batch size generates
max_tokens greedy tokens for as many chat prompts, left-padded, after one warm-up call; prints one JSON line
{batch: output tokens/s}.
"""

import argparse
import json
import time

import torch
import transformers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf_dir", required=True)
    ap.add_argument("--prompts_json", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max_tokens", type=int, default=64)
    args = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    with open(args.prompts_json) as f:
        prompts = json.load(f)
    out = {}
    for batch in args.batch:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in (prompts * batch)[:batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            model.generate(**enc, **kw)  # warm-up
            start = time.perf_counter()
            ids = model.generate(**enc, **kw)
            wall = time.perf_counter() - start
        new = ids[:, enc["input_ids"].shape[1]:]
        tokens = int((new != tok.pad_token_id).sum()) if tok.pad_token_id != tok.eos_token_id else new.numel()
        out[batch] = tokens / wall
    print(json.dumps(out))


if __name__ == "__main__":
    main()
