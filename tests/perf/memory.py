#!/usr/bin/env python3
"""Predicted against measured peak memory, whole and in tiles, and what tiles cost in time.

For each case (longest edge, optimiser, memory budget) runs `easel plan --json` (the
prediction, the strategy and tile size the planner picks) and then `easel bench --json` (the
measured peak RSS, VmHWM, and seconds per evaluation), and prints a Markdown table: the
README's memory table. Where the same size also ran whole, the last column is the tiled
run's seconds per evaluation over the whole run's (the same pixels, so per pixel too).

    tests/perf/memory.py [--easel target/release/easel] [--weights W.safetensors]
                         [--cases 256:adam:0,1024:adam:700,...] [--lbfgs-history 8]
                         [--backend auto|candle]

A case is SIZE:OPTIMIZER:BUDGET_MB (0: no limit beyond the machine's). Adam runs 2 timed
iterations; L-BFGS runs 12 with `history = --lbfgs-history`, so that the history is full by the
end and its peak is in the measurement. `--backend candle` runs candle's ops (`model.backend`), the
path a GPU takes, on the CPU: its model is the GPU's, less the im2col band that candle's CPU
convolution does not build whole (up to 256 MB; see `easel_vgg::memory`). Timings are only as good as the machine is quiet: the
load average is printed beside each run. Weights default to `easel weights synth --seed 0`.
Needs only the standard library.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CASES = (
    "256:adam:0,512:adam:0,1024:adam:0,2048:adam:0,"
    "1024:adam:700,2048:adam:1200,4096:adam:2048,"
    "256:lbfgs:0,512:lbfgs:0,512:lbfgs:300"
)


def easel(args, binary):
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"easel {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--easel", default=os.path.join(ROOT, "target/release/easel"))
    p.add_argument("--weights")
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--lbfgs-history", type=int, default=8)
    p.add_argument("--backend", default="auto", choices=["auto", "candle"])
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="easel-memory-")
    weights = a.weights or os.path.join(tmp, "synth0.safetensors")
    if not a.weights:
        subprocess.run([a.easel, "weights", "synth", "--seed", "0", "--out", weights], check=True,
                       capture_output=True)
    data = os.path.join(ROOT, "tests/data")
    rows, whole_s = [], {}
    for case in a.cases.split(","):
        size, optimizer, budget = case.split(":")
        config = os.path.join(tmp, f"{case.replace(':', '-')}.toml")
        with open(config, "w") as f:
            f.write(f"[limits]\nmemory_mb = {budget}\n[model]\nbackend = \"{a.backend}\"\n")
            if optimizer == "lbfgs":
                f.write(f"[optimizer]\nhistory = {a.lbfgs_history}\n")
        common = ["--content", f"{data}/content.png", "--style", f"{data}/style.png",
                  "--weights", weights, "--size", size, "--optimizer", optimizer, "--config", config]
        plan = easel(["plan", "--json", *common], a.easel)
        if not plan["fits"]:
            rows.append((size, optimizer, budget, "refused", plan["peak_rss_mb"], None, None, None, None))
            continue
        iterations = "12" if optimizer == "lbfgs" else "2"
        load = os.getloadavg()[0]
        bench = easel(["bench", "--json", "--iterations", iterations, *common], a.easel)
        tile = bench.get("tile_size")
        s = bench["s_per_eval"]
        if tile is None:
            whole_s[(size, optimizer)] = s
        ratio = s / whole_s[(size, optimizer)] if tile is not None and (size, optimizer) in whole_s else None
        rows.append((size, optimizer, budget, tile, plan["peak_rss_mb"], bench["peak_rss_mb"], s, ratio, load))
        print(json.dumps({"case": case, "plan": plan, "bench": bench, "load": load}), file=sys.stderr)

    print(f"backend: {a.backend}\n")
    print("| size | optimizer | budget MB | tiles | predicted MB | measured MB | error | s/eval | tiled/whole | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, optimizer, budget, tile, predicted, measured, s, ratio, load in rows:
        budget = budget if budget != "0" else "-"
        if tile == "refused":
            print(f"| {size} | {optimizer} | {budget} | refused | {predicted:.0f} | | | | | |")
            continue
        error = f"{(predicted - measured) / measured:+.1%}"
        tiles = f"{tile} px" if tile else "whole"
        r = f"{ratio:.2f}x" if ratio else ""
        print(f"| {size} | {optimizer} | {budget} | {tiles} | {predicted:.0f} | {measured:.0f} | {error} "
              f"| {s:.2f} | {r} | {load:.1f} |")


if __name__ == "__main__":
    main()
