#!/usr/bin/env python3
"""An r1v2 verifier plugin: exact match of the final answer, speaking JSON lines on stdin/stdout.

r1v2 starts this process once and keeps it alive. Each request is one line on stdin:
    {"id": 7, "prompt": "...", "response": "...", "answer": "...", "meta": {...}}
and the plugin answers with one line on stdout carrying the same id:
    {"id": 7, "score": 1.0, "format_ok": true, "reason": "...", "extracted": "..."}
Write diagnostics to stderr (r1v2 logs them); stdout is for replies only, flushed after each one.

Configure it in the verifier TOML (`r1v2 verify --config verifiers.toml`, or the run config's [verifiers]):

    [[plugins]]
    name = "exact"                          # dataset lines with "verifier": "exact" come here
    command = "python3"
    args = ["examples/plugin_verifier.py"]
    timeout_secs = 10                       # per request; a plugin that overruns is killed and restarted

This one takes the text after "Answer:" (else the last non-empty line) after any </think>, and compares it
with the reference answer, ignoring case, surrounding spaces and a trailing period.
"""
import json
import sys


def extract(response: str) -> str:
    text = response.rsplit("</think>", 1)[-1]
    if "Answer:" in text:
        return text.rsplit("Answer:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def judge(request: dict) -> dict:
    extracted = extract(request.get("response", ""))
    correct = normalise(extracted) == normalise(request.get("answer", ""))
    return {
        "id": request["id"],
        "score": 1.0 if correct else 0.0,
        "format_ok": "</think>" in request.get("response", ""),
        "extracted": extracted,
        "reason": "exact match" if correct else f"expected {request.get('answer', '')!r}, got {extracted!r}",
    }


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = judge(json.loads(line))
        except Exception as error:  # a bad request must not kill the plugin
            print(f"bad request: {error}", file=sys.stderr, flush=True)
            request_id = None
            try:
                request_id = json.loads(line).get("id")
            except Exception:
                pass
            reply = {"id": request_id, "score": 0.0, "format_ok": False, "reason": f"plugin error: {error}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
