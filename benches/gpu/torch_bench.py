#!/usr/bin/env python3
"""PyTorch + transformers beside r1v2's `gpu_bench` (actors/tests/cuda_support/bench.rs), on the same GPU in the same
run: the same Qwen2-0.5B-shaped model with random weights, the same shapes and the same counts.

    python3 benches/gpu/torch_bench.py [--bandwidth 4.3e12]

Prints `BENCH torch ...` lines: bf16 matmul TFLOP/s (best of 8192^3), decode tokens/s at batch 1 / 32 / 256
(`generate`, greedy, 64-token prompt, exactly 32 new tokens, after a warm-up, against the weight-bytes
bound), and forward+backward of token log-probs on (8, 512) tokens with its MFU (6 * params * tokens).
Needs torch and transformers only (no network: the config is built here).
"""
import argparse
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bandwidth", type=float, default=4.3e12)
    args = parser.parse_args()
    dev = torch.device("cuda")
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    best = min(timed(lambda: a @ a) for _ in range(10))
    flops = 2 * n**3 / best
    print(f"BENCH torch matmul_bf16_tflops {flops / 1e12:.1f}", flush=True)
    del a
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        model = Qwen2ForCausalLM(cfg).to(device=dev, dtype=dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        weight_bytes = params * (2 if dtype == torch.bfloat16 else 4)
        name = "BF16" if dtype == torch.bfloat16 else "F32"
        for batch in (1, 32, 256):
            ids = torch.ones(batch, 64, dtype=torch.long, device=dev)
            gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                model.generate(ids, **gen)  # warm-up
                secs = timed(lambda: model.generate(ids, **gen))
            tps = batch * 32 / secs
            bound = batch / (weight_bytes / args.bandwidth)
            print(f"BENCH torch decode {name} batch {batch} tokens_per_s {tps:.0f} bound {bound:.0f} "
                  f"({100 * tps / bound:.0f}% of it; prefill included)", flush=True)
        model.train()
        ids = torch.ones(8, 512, dtype=torch.long, device=dev)

        def step():
            logits = model(ids).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum()
            lp.backward()

        step()
        best = min(timed(step) for _ in range(3))
        mfu = 6 * params * ids.numel() / best / flops
        print(f"BENCH torch train {name} fwd_bwd_s {best:.3f} tokens_per_s {ids.numel() / best:.0f} "
              f"mfu {100 * mfu:.1f}%", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
