"""A verifier plugin for the fault tests: the first request it ever receives (across restarts: a marker file named
by $HANG_MARKER remembers) hangs for $HANG_SECONDS (default 30) seconds; every other request scores 1 when the response's first letter is the
answer's."""
import json
import os
import sys
import time

marker = os.environ["HANG_MARKER"]
for line in sys.stdin:
    request = json.loads(line)
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(float(os.environ.get("HANG_SECONDS", "30")))
    response = request["response"].strip()
    score = 1.0 if response[:1] == request["answer"] else 0.0
    print(json.dumps({"id": request["id"], "score": score, "format_ok": True, "reason": "first letter"}), flush=True)
