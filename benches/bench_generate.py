#!/usr/bin/env python3
"""Sampled generation speed (tokens/s), r1v2 beside Hugging Face transformers `generate`, in one run.

    /path/to/venv/bin/python benches/bench_generate.py [--threads 2] [--prompt-len 16] [--new-tokens 64]
        [--batches 1,8,64] [--configs 20M,100M] [--quick] [--bin target/release/examples/bench_generate]
        [--baseline-bin OTHER_BUILD] [--repeats 1]

For each config (a ~20M- and a ~100M-parameter Qwen2, f32, random weights seeded with torch.manual_seed(0)),
the model is saved with save_pretrained into a temporary directory; transformers `generate` is timed on it
(sampling at temperature 1, no top-k/top-p/repetition penalty, no EOS so every row makes exactly
`new-tokens` tokens) with `torch.set_num_threads(T)`, then `cargo run --release --example bench_generate`
runs r1v2 on the same directory with RAYON_NUM_THREADS=T and the same sampling. A batch of B rows is
B // 8 prompts x 8 responses when B >= 8 (GRPO's shape: `num_return_sequences=8` in transformers, groups of
n = 8 in r1v2), else B prompts x 1. Both timings cover the whole request, prefill included, after one
warm-up run (`--repeats R`: each case R times, interleaved, best kept; use it on a shared machine).
`--quick` uses 8-token prompts, 16 new tokens and only the 20M config.
Needs torch + transformers (tests/fixtures/requirements.txt).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    # 8192 x 512 tied embeddings (4.2M) + 6 layers x 2.8M: ~21M (the shape of bench_forward.py).
    "20M": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=2),
    # 32000 x 768 tied embeddings (24.6M) + 12 layers x 6.1M: ~98M.
    "100M": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=2),
}


def build(name):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**CONFIGS[name], max_position_embeddings=2048, rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32",
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).float().eval()
    # Random weights are tiny (init std 0.02); nothing else to do: speed does not depend on their values.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def shape(batch):
    """(prompts, responses per prompt) of a batch of `batch` rows."""
    return (batch // 8, 8) if batch >= 8 and batch % 8 == 0 else (batch, 1)


def time_transformers(model, prompts, n, prompt_len, new_tokens):
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (prompts, prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  repetition_penalty=1.0, num_return_sequences=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(**kwargs, max_new_tokens=min(4, new_tokens))  # warm-up
        start = time.perf_counter()
        out = model.generate(**kwargs, max_new_tokens=new_tokens)
        seconds = time.perf_counter() - start
    made = (out.shape[1] - prompt_len) * out.shape[0]
    assert made == prompts * n * new_tokens, (out.shape, prompts, n, new_tokens)
    return made / seconds


def time_r1v2(binary, model_dir, prompts, n, prompt_len, new_tokens, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    run = [binary] if binary else ["cargo", "run", "--quiet", "--release", "--example", "bench_generate", "--"]
    cmd = run + ["--model", model_dir, "--prompts", str(prompts), "-n", str(n), "--threads", str(threads),
           "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_generate failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == prompts * n * new_tokens, result
    return result["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--configs", default="20M,100M")
    ap.add_argument("--quick", action="store_true", help="8-token prompts, 16 new tokens, 20M only")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every case this many times, interleaved, keeping each side's best (a shared, "
                         "noisy machine)")
    ap.add_argument("--bin", help="a prebuilt bench_generate binary to run instead of `cargo run --release`")
    ap.add_argument("--baseline-bin", help="another bench_generate binary (e.g. an older commit's) timed in the "
                    "same run: adds a 'baseline' column")
    args = ap.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.configs = 8, 16, "20M"

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.configs.split(","):
        model = build(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            for batch in batches:
                prompts, n = shape(batch)
                hf, ours, base = 0.0, 0.0, None
                for _ in range(args.repeats):  # interleaved; the best of each side is kept
                    hf = max(hf, time_transformers(model, prompts, n, args.prompt_len, args.new_tokens))
                    ours = max(ours, time_r1v2(args.bin, tmp, prompts, n, args.prompt_len, args.new_tokens,
                                               args.threads))
                    if args.baseline_bin:
                        base = max(base or 0.0, time_r1v2(args.baseline_bin, tmp, prompts, n, args.prompt_len,
                                                          args.new_tokens, args.threads))
                rows.append((f"{name} ({params:.1f}M)", f"{batch} ({prompts}x{n})", hf, ours, base))
                print(f"  {rows[-1][0]} batch {rows[-1][1]}: transformers {hf:,.0f} tok/s, r1v2 {ours:,.0f}"
                      + (f", baseline {base:,.0f}" if base else ""), file=sys.stderr, flush=True)

    print(f"Qwen2 f32, CPU, {args.threads} threads; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens "
          f"per row, sampling (temperature 1), no EOS; best of {args.repeats}; "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    base_head = " baseline r1v2 tok/s | baseline / transformers |" if args.baseline_bin else ""
    print("| config | batch (prompts x n) | transformers tok/s | r1v2 tok/s | r1v2 / transformers |" + base_head)
    print("|---|---|---|---|---|" + ("---|---|" if args.baseline_bin else ""))
    for name, batch, hf, ours, base in rows:
        extra = f" {base:,.0f} | {base / hf:.2f}x |" if base else ""
        print(f"| {name} | {batch} | {hf:,.0f} | {ours:,.0f} | {ours / hf:.2f}x |" + extra)


if __name__ == "__main__":
    main()
