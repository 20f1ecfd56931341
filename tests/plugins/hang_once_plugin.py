"""A verifier plugin for the fault test: the first request it ever receives (across restarts: a marker file named
by $HANG_MARKER remembers) hangs forever; every other request scores 1 when the response's first letter is the
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
        time.sleep(3600)
    response = request["response"].strip()
    score = 1.0 if response[:1] == request["answer"] else 0.0
    print(json.dumps({"id": request["id"], "score": score, "format_ok": True, "reason": "first letter"}), flush=True)
