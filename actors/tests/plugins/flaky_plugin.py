"""A misbehaving plugin for the tests: crashes on "crash", hangs on "hang", answers "wrong-id" with another
id first, prints noise on "noise", replies without a score on "malformed", else scores 1 when the response equals the answer."""
import json
import sys
import time

print("flaky plugin started", file=sys.stderr, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    response = request["response"]
    if response == "crash":
        print("crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if response == "hang":
        time.sleep(3600)
    if response == "wrong-id":
        print(json.dumps({"id": request["id"] + 1000, "score": 1.0}), flush=True)
    if response == "malformed":
        print(json.dumps({"id": request["id"], "verdict": "yes"}), flush=True)
        continue
    if response == "noise":
        print("this line is not JSON", flush=True)
    score = 1.0 if response == request["answer"] else 0.0
    reply = {"id": request["id"], "score": score, "format_ok": True, "reason": "pid %d" % __import__("os").getpid()}
    print(json.dumps(reply), flush=True)
