#!/usr/bin/env python3
"""Prints the path of each test executable named in `cargo test --no-run --message-format json`
output (read on stdin), one a line: how deploy/cuda-build.sh and deploy/gpu-check.sh find the
golden test binaries they build or pack."""
import json
import sys

for line in sys.stdin:
    if not line.startswith("{"):
        continue
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["profile"]["test"]:
        print(message["executable"])
