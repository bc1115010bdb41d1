#!/usr/bin/env bash
# End-to-end agreement of an aarch64 build (run through a runner such as qemu-user) with the
# x86-64 build, on synthetic weights:
#   - `easel eval --json` at 96 px at the initial image, and at 64 px at the style image: every
#     loss value, gradient norm and the total within 1e-4 relative (the convolutions' own
#     sums may be added in another order by each architecture's gemm kernels);
#   - `easel run` at 64 px, where the features are bit-identical on both, 5 iterations with
#     L-BFGS and with Adam: the same loss at every iteration (as logged, to the last bit) and
#     the same PNG, byte for byte (the optimisers' sums are added in an order the code fixes).
# Sizes and iterations are small because qemu runs the aarch64 build 50-100x slower.
# Usage: .ci/aarch64-e2e.sh X86_EASEL ARM_EASEL [RUNNER WORDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
x86=$1
arm=$2
shift 2
runner=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
content=tests/data/content.png
style=tests/data/style.png
weights=$work/synth.safetensors
"$x86" weights synth --seed 0 --out "$weights" >/dev/null 2>&1

for case in "96 initial" "64 style"; do
  read -r size at <<<"$case"
  args=(eval --json --content "$content" --style "$style" --weights "$weights" --size "$size" --threads 2)
  [ "$at" = style ] && args+=(--at "$style")
  "$x86" "${args[@]}" >"$work/x86.json" 2>/dev/null
  "${runner[@]}" "$arm" "${args[@]}" >"$work/arm.json" 2>/dev/null
  python3 - "$work/x86.json" "$work/arm.json" "$at image at $size px" <<'PY'
import json, sys
x86, arm = (json.load(open(p)) for p in sys.argv[1:3])
def values(report):
    out = {"total": report["total"]}
    for loss in report["losses"]:
        for key in ("value", "grad_l2"):
            out[f'{loss["type"]}.{key}'] = loss[key]
    return out
a, b = values(x86), values(arm)
if a.keys() != b.keys():
    sys.exit(f"eval reports differ in their losses: {sorted(a)} vs {sorted(b)}")
worst = 0.0
for key in a:
    scale = max(abs(a[key]), abs(b[key]))
    rel = abs(a[key] - b[key]) / scale if scale > 0 else 0.0
    worst = max(worst, rel)
    if rel > 1e-4:
        sys.exit(f"eval at the {sys.argv[3]}: {key} is {a[key]} on x86-64, {b[key]} on aarch64 ({rel:.2e} relative)")
print(f"eval at the {sys.argv[3]}: {len(a)} values agree, worst {worst:.2e} relative")
PY
done

# The loss of every iteration, from the debug log.
losses() {
  python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue  # the summary line
    fields = json.loads(line).get("fields", {})
    if fields.get("message") == "iteration":
        print(fields["iteration"], repr(fields["loss"]))
'
}
for optimizer in lbfgs adam; do
  args=(run --content "$content" --style "$style" --weights "$weights" --size 64 --iterations 5
        --threads 2 --optimizer "$optimizer" -v --log-format json)
  "$x86" "${args[@]}" --out "$work/x86-$optimizer.png" 2>&1 >/dev/null | losses >"$work/x86-$optimizer.txt"
  "${runner[@]}" "$arm" "${args[@]}" --out "$work/arm-$optimizer.png" 2>&1 >/dev/null |
    losses >"$work/arm-$optimizer.txt"
  if [ "$(wc -l <"$work/x86-$optimizer.txt")" -ne 5 ]; then
    echo "run with $optimizer: expected 5 iterations in the log, got:" >&2
    cat "$work/x86-$optimizer.txt" >&2
    exit 1
  fi
  if ! diff "$work/x86-$optimizer.txt" "$work/arm-$optimizer.txt" >&2; then
    echo "run at 64 px with $optimizer: the losses differ (x86-64 <, aarch64 >)" >&2
    exit 1
  fi
  if ! cmp "$work/x86-$optimizer.png" "$work/arm-$optimizer.png"; then
    echo "run at 64 px with $optimizer: the aarch64 PNG differs from the x86-64 one" >&2
    exit 1
  fi
  echo "run at 64 px with $optimizer: the same 5 losses and the same PNG on both" \
    "(last loss $(tail -1 "$work/x86-$optimizer.txt" | cut -d' ' -f2))"
done
