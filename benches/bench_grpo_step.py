#!/usr/bin/env python3
"""A whole GRPO step, r1v2 (`r1v2 train`) beside TRL's GRPOTrainer: same machine, threads and weights.

    /path/to/venv/bin/python benches/bench_grpo_step.py [--threads 2] [--steps 6] [--sizes 3m,20m]

Per size, a Qwen2 policy (random, seeded) is trained for `--steps` GRPO steps on text prompts by both,
4 prompts x G = 8, up to 64 completion tokens at temperature 1, KL on (beta = kl_coef = 0.04), one update per
step (the whole batch of 32 in one micro-batch), reward = a tiny Qwen2 reward model (the same weights on both
sides) plus a rule check of the answer. It prints one table of median step times over steps 2..N with the
stage split, and each process's peak RSS.

How the two sides line up:
- `r1v2 train` trains an InternVL-chat policy; with text-only prompts its vision tower and adapter never run,
  so the policy is the chat model's Qwen2 LLM (`model.tiny`: hidden H, heads H/16, KV heads H/32, MLP 2H,
  vocab 328, untied head; only the LLM trains). r1v2 writes it to RUN_DIR/init-model; TRL loads the same
  `language_model.*` tensors into a transformers `Qwen2ForCausalLM`, and the reward model r1v2 wrote
  (RUN_DIR/init-reward-model, a `Qwen2ForSequenceClassification`) as its reward model.
- The prompts are the rendered chat text r1v2 feeds its model (`<|im_start|>user\\n...<|im_end|>\\n
  <|im_start|>assistant\\n`), given to TRL as plain-text prompts; generation stops at `<|im_end|>` on both.
- TRL runs in f32 (`bf16=False`) without gradient checkpointing (its default is on, which is slower), eager.
- Stages: r1v2's `timing_s/gen`, `timing_s/verify`/`timing_s/reward` (run concurrently: the larger is shown)
  and `timing_s/update` (the reference and policy log-probs, backward, AdamW) from metrics.jsonl; TRL's are
  timed by wrapping `_generate` (generation), `_calculate_rewards` (scoring), the rest of
  `_generate_and_score_completions` (tokenisation, the reference model's log-probs: "ref" column) and the
  rest of the optimiser step (policy log-probs, backward, AdamW: "update").
Each side runs in its own process (so peak RSS is its own): `--worker trl` is this script's TRL half.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (hidden, layers) of r1v2's tiny Qwen2 (tiny.rs: heads = hidden / 16, MLP = 2 * hidden, vocab 328).
SIZES = {"3m": (256, 5), "20m": (512, 8)}
PROMPTS_PER_STEP, GROUP, MAX_NEW, BETA = 4, 8, 64, 0.04


def questions(n):
    """n arithmetic questions (id, question, answer)."""
    return [(f"q{i}", f"What is {i % 17 + 2} + {i % 11 + 3}? Answer with a number.", str(i % 17 + 2 + i % 11 + 3))
            for i in range(n)]


def chat_prompt(question):
    """r1v2's chat template (src/text/chat.rs) without a system message."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def r1v2_config(hidden, layers, steps, data):
    return f"""
[run]
seed = 0
mode = "sync"
deterministic = true
checkpoint_every = 0
keep_checkpoints = 1
log_level = "warn"

[model]
tiny = {{ seed = 0, hidden = {hidden}, layers = {layers} }}

[data]
path = "{data}"
prompts_per_step = {PROMPTS_PER_STEP}

[generation]
group_size = {GROUP}

[generation.sampling]
temperature = 1.0
top_p = 1.0
max_new_tokens = {MAX_NEW}

[[stages]]
kind = "grpo"
steps = {steps}

[rl.grpo]
kl_coef = {BETA}

[reward_model]
tiny = {{ seed = 1, hidden = 64, layers = 2 }}

[optimizer]
lr = 1e-6
warmup_steps = 0
total_steps = {steps}
micro_batch = {PROMPTS_PER_STEP * GROUP}
trainable = {{ vision = false, adapter = false, llm = true }}
"""


def run_r1v2(binary, work, size, steps, threads):
    hidden, layers = SIZES[size]
    data = work / "train.jsonl"
    with data.open("w") as f:
        for qid, q, a in questions(steps * PROMPTS_PER_STEP):
            f.write(json.dumps({"id": qid, "question": q, "images": [], "answer": a, "verifier": "math"}) + "\n")
    config = work / f"grpo-{size}.toml"
    config.write_text(r1v2_config(hidden, layers, steps, data))
    run_dir = work / f"run-{size}"
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    rss_file = work / "r1v2-maxrss"
    # GNU time's %M: the process's own peak resident set, in KiB.
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), str(binary), "train", str(config),
                           "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"r1v2 train failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r.get("metrics", r) for r in rows]
    stages = []
    for r in rows:
        stages.append({
            "step": r["timing_s/step"],
            "gen": r["timing_s/gen"],
            "score": max(r.get("timing_s/verify", 0.0), r.get("timing_s/reward", 0.0)),
            "ref": float("nan"),
            "update": r["timing_s/update"] + r.get("timing_s/sync", 0.0),
            "length": r.get("response_length/mean", float("nan")),
        })
    return stages, int(rss_file.read_text().split()[-1]) / 1024, run_dir


def load_trl_models(run_dir, out_dir):
    """The policy (language_model.* of r1v2's init-model) as a transformers Qwen2 dir + the tokenizer."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    init = run_dir / "init-model"
    llm_config = json.loads((init / "config.json").read_text())["llm_config"]
    config = Qwen2Config(**{k: v for k, v in llm_config.items() if k not in ("architectures", "model_type")})
    model = Qwen2ForCausalLM(config).float()
    prefix = "language_model."
    tensors = {k[len(prefix):]: v for k, v in load_file(init / "model.safetensors").items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        sys.exit(f"policy weights: missing {missing}, unexpected {unexpected}")
    model.generation_config.eos_token_id = 322
    model.generation_config.pad_token_id = 320
    model.save_pretrained(out_dir / "policy", safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(init / "tokenizer.json"), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir / "policy")
    rm = run_dir / "init-reward-model"
    rm_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(rm / "tokenizer.json"), eos_token="<|im_end|>",
                                           pad_token="<|endoftext|>")
    rm_tokenizer.save_pretrained(out_dir / "rm-tokenizer")
    n_params = sum(p.numel() for p in model.parameters())
    return out_dir / "policy", rm, out_dir / "rm-tokenizer", n_params


def trl_worker(args):
    """One TRL run; prints one JSON line with per-step stage times and the peak RSS."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback)
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    policy = Path(args.policy)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(policy)
    tokenizer.padding_side = "left"
    rm_tokenizer = PreTrainedTokenizerFast.from_pretrained(args.rm_tokenizer)
    rm = AutoModelForSequenceClassification.from_pretrained(args.rm, dtype=torch.float32, num_labels=1)
    rm.config.pad_token_id = 320
    qs = questions(args.steps * PROMPTS_PER_STEP)
    dataset = Dataset.from_list([{"prompt": chat_prompt(q), "answer": a} for _, q, a in qs])

    def rule_reward(completions, answer, **_):
        # The math verifier's gist: the last number in the completion equals the answer.
        out = []
        for text, ans in zip(completions, answer):
            nums = [t for t in "".join(c if c.isdigit() else " " for c in text).split()]
            out.append(1.0 if nums and nums[-1] == ans else 0.0)
        return out

    config = GRPOConfig(
        output_dir=args.out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=GROUP, max_completion_length=MAX_NEW,
        temperature=1.0, top_p=1.0, top_k=0, beta=BETA, learning_rate=1e-6, max_steps=args.steps,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
        shuffle_dataset=False, model_init_kwargs={"dtype": torch.float32},
    )
    trainer = GRPOTrainer(model=str(policy), reward_funcs=[rule_reward, rm], args=config, train_dataset=dataset,
                          processing_class=tokenizer, reward_processing_classes=[None, rm_tokenizer])
    clock = {"gen": 0.0, "score": 0.0, "gen_and_score": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock[name] += time.perf_counter() - start
        return wrapper

    trainer._generate = timed("gen", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("gen_and_score", trainer._generate_and_score_completions)
    steps, lengths = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            for k in clock:
                clock[k] = 0.0
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.start
            steps.append({"step": total, "gen": clock["gen"], "score": clock["score"],
                          "ref": clock["gen_and_score"] - clock["gen"] - clock["score"],
                          "update": total - clock["gen_and_score"]})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer.add_callback(StepTimer())
    trainer.train()
    for s, length in zip(steps, lengths):
        s["length"] = length
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"stages": steps, "peak_rss_mib": peak, "torch": torch.__version__}))


def median_row(stages):
    later = stages[1:] or stages
    return {k: statistics.median(s[k] for s in later) for k in later[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sizes", default="3m,20m")
    ap.add_argument("--binary", default=str(ROOT / "target/release/r1v2"),
                    help="the release r1v2 binary (cargo build --release)")
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--rm", help=argparse.SUPPRESS)
    ap.add_argument("--rm-tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "trl":
        return trl_worker(args)
    if not Path(args.binary).is_file():
        sys.exit(f"{args.binary} not found: run `cargo build --release` first")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            work = Path(tmp) / size
            work.mkdir()
            r1v2_stages, r1v2_rss, run_dir = run_r1v2(Path(args.binary), work, size, args.steps, args.threads)
            policy, rm, rm_tok, n_params = load_trl_models(run_dir, work)
            # Passive OpenMP waits: on a shared machine torch's spinning workers collapse (a step ran 10x slower with
            # the default active wait at load 10 on 2 cores); r1v2's binary likewise keeps candle's spinning pool
            # off (CANDLE_NUM_THREADS=1). A value set by the caller wins.
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            cmd = [sys.executable, __file__, "--worker", "trl", "--threads", str(args.threads), "--steps",
                   str(args.steps), "--policy", str(policy), "--rm", str(rm), "--rm-tokenizer", str(rm_tok),
                   "--out", str(work / "trl-out")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"TRL worker failed:\n{proc.stderr[-6000:]}")
            trl = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append((size, n_params, median_row(trl["stages"]), trl["peak_rss_mib"],
                            median_row(r1v2_stages), r1v2_rss, trl["torch"]))

    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} CPUs; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')} for TRL")
    print(f"GRPO step: {PROMPTS_PER_STEP} prompts x G={GROUP}, <= {MAX_NEW} completion tokens, KL beta {BETA}, "
          f"one update per step, {args.threads} threads, f32; median of steps 2..{args.steps} (seconds)")
    print("| model | side | step | generation | scoring | ref log-probs | update | mean length | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, n, trl, trl_rss, r1, r1_rss, torch_version in results:
        for side, row, rss in ((f"TRL 1.16 (torch {torch_version})", trl, trl_rss), ("r1v2 train", r1, r1_rss)):
            ref = "in update" if row["ref"] != row["ref"] else f"{row['ref']:.2f}"
            print(f"| {n / 1e6:.1f}M | {side} | {row['step']:.2f} | {row['gen']:.2f} | {row['score']:.3f} | {ref} | "
                  f"{row['update']:.2f} | {row['length']:.1f} | {rss:.0f} |")
        print(f"| {n / 1e6:.1f}M | r1v2 / TRL | {r1['step'] / trl['step']:.2f}x | {r1['gen'] / trl['gen']:.2f}x | | | "
              f"{r1['update'] / (trl['update'] + trl['ref']):.2f}x (ref + update) | | {r1_rss / trl_rss:.2f}x |")


if __name__ == "__main__":
    main()
