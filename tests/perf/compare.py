#!/usr/bin/env python3
"""Side-by-side timing of easel and the PyTorch yardstick (issue #4).

Runs `easel bench` and `gatys_torch.py` (copied here from the team's shared peer set, header
and attribution kept) on the same content/style images and the same safetensors weights, at
each --size, both with Adam (one loss+gradient evaluation per iteration), alternating the two
tools so that any background load hits both alike. Prints a table of seconds per evaluation
(median of the iterations after the first, the fastest of the repeats), their ratio
easel/torch, the median over the repeats of the ratio within each repeat (`med`: less
sensitive to the machine's drift than the ratio of the fastest runs), and peak RSS, then one
JSON line with every raw result.

    tests/perf/compare.py [--sizes 128,256,512] [--iters 8] [--repeats 1] [--threads 2]
                          [--winograd deep,all]
                          [--python /work/torch-venv/bin/python] [--easel target/release/easel]
                          [--weights W.safetensors] [--goal 0.8] [--rss-goal-mb 600]
                          [--device cpu|cuda|cuda:N]

Each mode of --winograd is a separate easel run (`[model] winograd = MODE` in a config file):
`deep` is easel's default (input gradients, and the forward passes from conv3_1 on, as
Winograd), `gradients` runs only the input gradients as Winograd, `all` every forward pass
too, `none` is all direct convolution. On a GPU (`--device cuda`) easel runs candle's ops, which
ignore `winograd`: run one mode there.

`--device` puts both tools on that device: `[model] device` in easel's config file, `--device`
for gatys_torch.py (whose timings then synchronise the GPU; easel's do, as every iteration reads
its loss back). Its JSON adds `gpu_peak_mb`; peak RSS is then host memory only.

Weights default to `easel weights synth --seed 0` written to a temporary folder. The PyTorch
interpreter defaults to $TORCH_PYTHON, then /work/torch-venv/bin/python, then python3.
Needs only the standard library itself. Exit status 0 always (it measures, it does not judge),
unless a tool fails.

Timings are only as good as the machine is quiet: each run records the CPU time that other
processes used while it ran (`other` column, as a fraction of all cores); rerun when it is high.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def cpu_busy_s():
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(v) for v in fh.readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_json(cmd):
    """Runs cmd, returns (last JSON line of stdout, fraction of all cores other processes used)."""
    t0, b0 = time.perf_counter(), cpu_busy_s()
    r0 = os.times()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    r1 = os.times()
    own = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    other = max(0.0, cpu_busy_s() - b0 - own) / (wall * (os.cpu_count() or 1))
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"no JSON from: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1]), other


def default_python():
    for p in (os.environ.get("TORCH_PYTHON"), "/work/torch-venv/bin/python"):
        if p and os.path.exists(p):
            return p
    return shutil.which("python3") or "python3"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256,512")
    ap.add_argument("--iters", type=int, default=8, help="Adam iterations per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and size; the fastest counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=default_python())
    ap.add_argument("--easel", default=os.path.join(ROOT, "target", "release", "easel"))
    ap.add_argument("--weights")
    ap.add_argument("--content", default=os.path.join(ROOT, "tests", "data", "content.png"))
    ap.add_argument("--style", default=os.path.join(ROOT, "tests", "data", "style.png"))
    ap.add_argument("--winograd", default="deep,all",
                    help="easel's model.winograd settings to run, comma-separated (none, gradients, deep, all)")
    ap.add_argument("--only", choices=["easel", "torch"], help="run one tool only")
    ap.add_argument("--goal", type=float, default=0.8, help="target ratio easel/torch")
    ap.add_argument("--rss-goal-mb", type=float, default=600.0, help="target easel peak RSS at 512 px")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both tools run")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="easel-compare-")
    weights = args.weights
    if not weights:
        weights = os.path.join(tmp, "synth0.safetensors")
        subprocess.run([args.easel, "weights", "synth", "--seed", "0", "--out", weights], check=True,
                       stdout=subprocess.DEVNULL)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    modes = [m for m in args.winograd.split(",") if m]
    for mode in modes:
        with open(os.path.join(tmp, f"{mode}.toml"), "w") as fh:
            fh.write(f'[model]\nwinograd = "{mode}"\ndevice = "{args.device}"\n')
    results = []
    for size in sizes:
        tools = []
        for mode in modes:
            tools.append((f"easel:{mode}", [
                args.easel, "--threads", str(args.threads), "bench", "--content", args.content,
                "--style", args.style, "--weights", weights, "--size", str(size),
                "--config", os.path.join(tmp, f"{mode}.toml"),
                "--iterations", str(args.iters), "--optimizer", "adam", "--json"]))
        # easel's default job: content 1 on relu4_2, gram 1e6 on relu1_1..relu5_1, tv 1e-3.
        tools.append(("torch", [
            args.python, os.path.join(HERE, "gatys_torch.py"), "--content", args.content,
            "--style", args.style, "--weights", weights, "--size", str(size),
            "--iters", str(args.iters), "--optimizer", "adam", "--style-weight", "1e6",
            "--tv-weight", "1e-3", "--threads", str(args.threads), "--device", args.device]))
        best = {}
        # Seconds per evaluation of each tool in each repeat: a repeat runs the tools one after
        # the other, so the ratio within a repeat compares runs minutes apart at most.
        times = {}
        for _ in range(args.repeats):
            for tool, cmd in tools:
                if args.only and not tool.startswith(args.only):
                    continue
                res, other = run_json(cmd)
                if tool.startswith("easel"):
                    s, rss, loss0 = res["s_per_iter"], res["peak_rss_mb"], res["loss_first"]
                else:
                    s, rss, loss0 = res["iter_s_median"], res["peak_rss_mb"], res["initial_loss"]["total"]
                times.setdefault(tool, []).append(s)
                row = dict(s_per_eval=s, peak_rss_mb=rss, other_cpu=other, loss_first=loss0, raw=res)
                if tool not in best or s < best[tool]["s_per_eval"]:
                    best[tool] = row
        for tool, row in best.items():
            torch_times = times.get("torch", [])
            if tool.startswith("easel") and len(torch_times) == len(times[tool]):
                row["ratios"] = [e / t for e, t in zip(times[tool], torch_times)]
        results.append(dict(size=size, **best))

    print(f"{'size':>5} {'winograd':>9} {'easel s/eval':>13} {'torch s/eval':>13} {'ratio':>7} {'med':>6} "
          f"{'easel RSS MB':>13} {'torch RSS MB':>13} {'other cpu e/t':>14} {'loss0 e/t':>10}")
    for r in results:
        t = r.get("torch")
        for mode in modes if not args.only == "torch" else ["-"]:
            e = r.get(f"easel:{mode}")
            ratio = e["s_per_eval"] / t["s_per_eval"] if e and t else float("nan")
            med = statistics.median(e["ratios"]) if e and e.get("ratios") else float("nan")
            loss_ratio = e["loss_first"] / t["loss_first"] if e and t else float("nan")
            f = lambda d, k, fmt: format(d[k], fmt) if d else "-"
            print(f"{r['size']:>5} {mode:>9} {f(e, 's_per_eval', '13.4f')} {f(t, 's_per_eval', '13.4f')} "
                  f"{ratio:7.3f} {med:6.3f} {f(e, 'peak_rss_mb', '13.0f')} {f(t, 'peak_rss_mb', '13.0f')} "
                  f"{(format(e['other_cpu'], '.2f') if e else '-'):>6}/"
                  f"{(format(t['other_cpu'], '.2f') if t else '-'):<7} {loss_ratio:10.4f}")
    print(f"goal: ratio <= {args.goal} at 256 and 512 px; easel peak RSS <= {args.rss_goal_mb:.0f} MB at 512 px "
          f"(torch RSS includes its libraries: rss_baseline_mb, ~590 MB here, in its raw JSON)")
    print(json.dumps(dict(device=args.device, threads=args.threads, iters=args.iters, repeats=args.repeats, weights=weights,
                          results=[{k: ({kk: vv for kk, vv in v.items() if kk != "raw"} if isinstance(v, dict) else v)
                                    for k, v in r.items()} for r in results],
                          raw=[{k: v["raw"] for k, v in r.items() if isinstance(v, dict)} for r in results])))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
