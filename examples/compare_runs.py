#!/usr/bin/env python3
"""Compare two run directories of `r1v2 train` / `r1v2 demo`: are they the same run?

    python3 examples/compare_runs.py RUN_A RUN_B

Prints how many metrics.jsonl records differ once the machine-dependent keys (timing_s/*, perf/*) are left
out (with the first differing keys), and whether the checkpoints' tensors are equal: byte-equal files, else
(with numpy + safetensors installed) tensor by tensor. Exits 1 when the runs differ. With
`run.deterministic = true` a refactor, a resume or a change of placement.generator must keep this at 0.
Standard library only for the metrics; the tensor comparison needs `pip install numpy safetensors`.
"""
import glob
import hashlib
import json
import os
import sys


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = lambda k: not (k.startswith("timing_s/") or k.startswith("perf/"))
    return [{k: v for k, v in r.items() if keep(k)} for r in rows]


def weights(run):
    files = glob.glob(os.path.join(run, "checkpoints", "*", "model", "*.safetensors"))
    return {os.path.relpath(f, run): f for f in sorted(files)}


def same_tensors(a, b):
    try:
        import numpy as np
        from safetensors.numpy import load_file
    except ImportError:
        return None
    x, y = load_file(a), load_file(b)
    return sorted(x) == sorted(y) and all(
        x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x
    )


def main():
    a, b = sys.argv[1], sys.argv[2]
    ma, mb = metrics(a), metrics(b)
    differing = [i for i, (x, y) in enumerate(zip(ma, mb)) if x != y]
    print(f"metrics: {len(ma)} vs {len(mb)} records, {len(differing)} differ")
    for i in differing[:3]:
        keys = sorted(k for k in set(ma[i]) | set(mb[i]) if ma[i].get(k) != mb[i].get(k))
        print(f"  record {i}: " + ", ".join(f"{k} {ma[i].get(k)} vs {mb[i].get(k)}" for k in keys[:4]))
    wa, wb = weights(a), weights(b)
    same = len(ma) == len(mb) and not differing and sorted(wa) == sorted(wb)
    for name in sorted(set(wa) & set(wb)):
        digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
        if digest(wa[name]) == digest(wb[name]):
            verdict = "same bytes"
        else:
            equal = same_tensors(wa[name], wb[name])
            verdict = {True: "same tensors (file layout differs)", False: "DIFFERENT tensors",
                       None: "different bytes (install numpy + safetensors to compare tensors)"}[equal]
            same = same and bool(equal)
        print(f"{name}: {verdict}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
