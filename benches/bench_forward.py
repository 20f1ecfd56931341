#!/usr/bin/env python3
"""Forward and forward+backward time of a ~20M-parameter Qwen2, r1v2 (candle) beside PyTorch, one run.

    /path/to/venv/bin/python benches/bench_forward.py [--threads 2] [--batch 4] [--seq 128] [--iters 5]

Times are medians of --iters runs after a warm-up; the last row is each process's peak resident set (VmHWM,
Linux) above its resident set once the model and batch are loaded: the forward+backward's peak allocation.

Builds the model once with transformers (random weights, seeded), saves it to a temporary directory, times
PyTorch on it, then runs `cargo run --release --example bench_forward` on the same directory with the same
thread count, and prints one table. Needs torch + transformers (tests/fixtures/requirements.txt).
"""
import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config():
    from transformers import Qwen2Config

    # ~20M parameters: 8192 x 512 tied embeddings (4.2M) + 6 layers x 2.8M.
    return Qwen2Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )


def time_torch(model, ids, iters):
    import torch

    mask = torch.ones_like(ids)
    targets = ids[:, 1:]

    def fwd():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask).logits

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (-logp.mean()).backward()

    out = {}
    for name, f in (("forward", fwd), ("forward+backward", fwd_bwd)):
        f()  # warm-up
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return float(line.split()[1])
    raise KeyError(field)


def main():
    # Passive OpenMP waits (before torch starts its threads): on a shared machine torch's spinning workers
    # collapse under load; the Rust side likewise keeps candle's spinning pool off. A caller's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = Qwen2ForCausalLM(config()).float()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: loading's own peak does not count
        loaded = status_kib("VmRSS")
        torch_times = time_torch(model, ids, args.iters)
        # Peak resident set (VmHWM) above the resident set once the model and batch were loaded.
        torch_times["peak_rss_mib"] = (status_kib("VmHWM") - loaded) / 1024
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        cmd = [
            "cargo", "run", "--quiet", "--release", "--example", "bench_forward", "--",
            "--model", tmp, "--batch", str(args.batch), "--seq", str(args.seq), "--iters", str(args.iters),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_forward failed:\n{proc.stderr}")
        rust_times = json.loads(proc.stdout.strip().splitlines()[-1])

    tokens = args.batch * args.seq
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"Qwen2 {n_params / 1e6:.1f}M params, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"f32, median of {args.iters} iterations")
    print(f"| pass | PyTorch {torch.__version__} (ms) | r1v2 candle (ms) | r1v2 tokens/s | speed-up |")
    print("|---|---|---|---|---|")
    for name in ("forward", "forward+backward"):
        pt, rs = torch_times[name], rust_times[name]
        print(f"| {name} | {pt * 1e3:.1f} | {rs * 1e3:.1f} | {tokens / rs:,.0f} | {pt / rs:.2f}x |")
    pt, rs = torch_times["peak_rss_mib"], rust_times["peak_rss_mib"]
    print(f"| peak RSS above the loaded model (MiB) | {pt:.0f} | {rs:.0f} | | {rs / pt:.2f}x of PyTorch's |")


if __name__ == "__main__":
    main()
