#!/usr/bin/env bash
# Checks easel on a GPU in one run: the golden tests on the device, `easel eval` on the device
# against the CPU, and seconds per evaluation against PyTorch (tests/perf/gatys_torch.py) on the
# same device. Made for a GPU machine without a Rust toolchain (a lent one, a Jetson): build and
# pack where cargo is, carry the folder over, run it there. See deploy/cuda.md.
#
#   deploy/gpu-check.sh pack DIR [--target T] [--tests-list FILE]
#       After `deploy/cuda-build.sh --link --tests`: puts T/release/easel and the test binaries
#       FILE lists (default T/cuda-golden-tests.txt, which that script writes) into DIR,
#       stripped and xz-compressed: the 60 MB CUDA binary becomes about 10 MB. T defaults to
#       $CARGO_TARGET_DIR, else target.
#
#   deploy/gpu-check.sh run DIR [--device D] [--out O] [--python PY] [--lib-path P]
#                               [--sizes 512,1024,2048] [--iters 8] [--no-bench]
#       In a checkout of the repository (tests/data, tests/perf). Steps, each timed:
#       1. the test binaries with EASEL_TEST_DEVICE=D (default cuda) and EASEL_TEST_DATA;
#       2. `easel eval --json` at 128 and 512 px, on D and on the CPU: every loss's value and
#          gradient norm must agree within 1e-4 relative (the goldens' tolerance for them);
#       3. unless --no-bench, tests/perf/compare.py --device D with Adam at --sizes: easel bench
#          against gatys_torch.py under PY (default $TORCH_PYTHON, else python3), which needs
#          torch, numpy, pillow and safetensors.
#       Logs and summary.txt go to O (default DIR/report). Exit status 1 when a test or a
#       comparison fails; the benchmark measures and does not judge.
#       The CUDA libraries (cuBLAS, cuRAND, NVRTC, the runtime) are looked for in P, then in the
#       nvidia/*/lib folders of PY's site-packages (where PyTorch's CUDA wheels put them).
#
# `run DIR --device cpu --no-bench` on a CPU build checks the script itself (CI does so).
set -euo pipefail
# Paths on the command line are the caller's; the script works from the repository's root.
caller=$PWD
cd "$(dirname "$0")/.."
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }

elapsed() { echo "$(($(date +%s) - $1)) s"; }
usage() {
  sed -n '2,29p' "$0" >&2
  exit 2
}

pack() {
  local dir target=target list=""
  dir=$(absolute "$1")
  if [ -n "${CARGO_TARGET_DIR:-}" ]; then target=$(absolute "$CARGO_TARGET_DIR"); fi
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --target) target=$(absolute "$2"); shift 2 ;;
      --tests-list) list=$(absolute "$2"); shift 2 ;;
      *) usage ;;
    esac
  done
  list=${list:-$target/cuda-golden-tests.txt}
  [ -f "$list" ] || { echo "gpu-check: no list of test binaries at $list (deploy/cuda-build.sh --link --tests writes it)" >&2; exit 1; }
  mkdir -p "$dir/tests"
  local started bin name
  started=$(date +%s)
  strip -o "$dir/easel" "$target/release/easel"
  while read -r bin; do
    # golden-<hash> -> golden: the run step names its logs after the test.
    name=$(basename "$bin")
    strip -o "$dir/tests/${name%-*}" "$bin"
  done <"$list"
  xz -T0 -3 -f "$dir/easel" "$dir"/tests/*
  echo "gpu-check: packed in $(elapsed "$started"):" >&2
  du -ch "$dir/easel.xz" "$dir"/tests/*.xz >&2
}

# The nvidia/*/lib folders of $1's site-packages, joined by ':' (empty when it has none).
python_cuda_libs() {
  "$1" - <<'EOF' 2>/dev/null || true
import glob, os, site
dirs = []
for packages in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(packages, "nvidia", "*", "lib")))
print(":".join(dirs))
EOF
}

# `eval_pair SIZE`: easel eval on the CPU and on $device at SIZE px, at the seeded noise image
# (made on the host, so the same on both), where no loss is zero.
eval_pair() {
  local size=$1 d
  for d in cpu "$device"; do
    printf '[model]\ndevice = "%s"\n[run]\ninit = "noise"\n' "$d" >"$work/$d.toml"
    if ! "$easel" eval --config "$work/$d.toml" --content tests/data/content.png --style tests/data/style.png \
      --weights "$weights" --size "$size" --json \
      >"$out/eval-$size-$d.json" 2>"$out/eval-$size-$d.log"; then
      echo "  $size px on $d: easel eval failed: $(tail -1 "$out/eval-$size-$d.log")"
      return 1
    fi
  done
  python3 - "$out/eval-$size-cpu.json" "$out/eval-$size-$device.json" "$size" <<'EOF'
import json, sys
cpu, dev = (json.load(open(p)) for p in sys.argv[1:3])
worst = 0.0
rows = [("total", cpu["total"], dev["total"])]
for a, b in zip(cpu["losses"], dev["losses"]):
    rows += [(a["type"] + " value", a["value"], b["value"]), (a["type"] + " grad_l2", a["grad_l2"], b["grad_l2"])]
for what, a, b in rows:
    rel = abs(a - b) / max(abs(a), 1e-30)
    worst = max(worst, rel)
    print(f"  {sys.argv[3]:>5} px {what:<16} cpu {a:.9g}  device {b:.9g}  relative {rel:.2e}")
print(f"  {sys.argv[3]:>5} px worst relative difference {worst:.2e} (tolerance 1e-4)")
sys.exit(0 if worst <= 1e-4 else 1)
EOF
}

run() {
  local dir device=cuda out="" python=${TORCH_PYTHON:-python3} lib_path="" sizes=512,1024,2048 iters=8 bench=yes
  dir=$(absolute "$1")
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --device) device=$2; shift 2 ;;
      --out) out=$(absolute "$2"); shift 2 ;;
      --python) python=$2; shift 2 ;;
      --lib-path) lib_path=$2; shift 2 ;;
      --sizes) sizes=$2; shift 2 ;;
      --iters) iters=$2; shift 2 ;;
      --no-bench) bench=no; shift ;;
      *) usage ;;
    esac
  done
  out=${out:-$dir/report}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  local libs
  libs=$lib_path${lib_path:+:}$(python_cuda_libs "$python")
  export LD_LIBRARY_PATH="${libs%:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

  # Unpacked into a scratch folder: DIR may be read-only, as a carried folder can be.
  local f
  for f in "$dir/easel"* "$dir"/tests/*; do
    case "$f" in
      *.xz) xz -dc "$f" >"$work/$(basename "${f%.xz}")" ;;
      *) cp "$f" "$work/" ;;
    esac
  done
  chmod +x "$work"/*
  easel=$work/easel
  local failed=0 started summary=$out/summary.txt
  {
    echo "gpu-check on $(hostname), device $device, $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  } | tee "$summary"

  started=$(date +%s)
  local test
  for test in "$dir"/tests/*; do
    test=$(basename "${test%.xz}")
    if EASEL_TEST_DEVICE=$device EASEL_TEST_DATA=$PWD/tests/data "$work/$test" >"$out/test-$test.log" 2>&1; then
      echo "tests $test on $device: passed ($(grep -E '^test result' "$out/test-$test.log" | tail -1))" | tee -a "$summary"
    else
      failed=1
      echo "tests $test on $device: FAILED (see test-$test.log):" | tee -a "$summary"
      # The first failure's message (a device that does not answer fails every test alike).
      grep -m1 -A1 'panicked' "$out/test-$test.log" | tee -a "$summary"
      grep -E '^test result' "$out/test-$test.log" | tee -a "$summary"
    fi
  done
  echo "== step tests: $(elapsed "$started")" | tee -a "$summary"

  started=$(date +%s)
  weights=$work/synth0.safetensors
  "$easel" weights synth --seed 0 --out "$weights" >/dev/null 2>"$out/weights.log"
  local size
  for size in 128 512; do
    # pipefail: the pipeline fails when eval_pair does.
    if ! eval_pair "$size" | tee -a "$summary"; then
      failed=1
      echo "eval at $size px: FAILED (eval-$size-*.log)" | tee -a "$summary"
    fi
  done
  echo "== step eval: $(elapsed "$started")" | tee -a "$summary"

  if [ "$bench" = yes ]; then
    started=$(date +%s)
    # One winograd mode: the GPU runs candle's ops, which do not read it.
    if python3 tests/perf/compare.py --device "$device" --sizes "$sizes" --iters "$iters" --winograd deep \
      --threads "$(nproc)" --python "$python" --easel "$easel" --weights "$weights" >"$out/bench.txt" 2>"$out/bench.log"; then
      grep -v '^{' "$out/bench.txt" | tee -a "$summary"
    else
      failed=1
      echo "bench failed (bench.log):" | tee -a "$summary"
      tail -20 "$out/bench.log" | tee -a "$summary"
    fi
    echo "== step bench: $(elapsed "$started")" | tee -a "$summary"
  fi
  [ "$failed" = 0 ] && echo "gpu-check: passed" | tee -a "$summary"
  [ "$failed" = 0 ] || echo "gpu-check: FAILED" | tee -a "$summary"
  return "$failed"
}

[ $# -ge 2 ] || usage
command=$1
shift
case "$command" in
  pack) pack "$@" ;;
  run) run "$@" ;;
  *) usage ;;
esac
