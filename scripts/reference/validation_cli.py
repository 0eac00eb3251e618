"""The command line the offline validators share: check each path given, print what was found as one JSON line
per path, exit 1 naming the first path that fails (its error is the message)."""
import json
import pathlib
import sys


def run(check):
    for p in sys.argv[1:]:
        try:
            print(json.dumps(check(pathlib.Path(p))))
        except Exception as e:  # noqa: BLE001 — the message is the result
            print(f"{p}: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
