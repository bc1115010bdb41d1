#!/usr/bin/env bash
# NEON in the hot loops of the aarch64 build: disassembles BINARY and, in each function below,
# counts vector (`vN.4s`, `.2d`...) and scalar (`sN`, `dN`) floating-point instructions and
# stores of vector registers to the stack; fails if a count crosses its threshold (set from
# the build of 2026-11-30, with some slack: a regression is a loop that stopped being
# vectorised, or a big jump in stack traffic).
# The binary must be built with `-C symbol-mangling-version=v0` (.ci/run does), so that each
# kernel's name says which kernel it is. Needs aarch64-linux-gnu-objdump and python3.
# Usage: .ci/neon-check.sh BINARY
set -euo pipefail
bin=$1
dis=$(mktemp)
trap 'rm -f "$dis"' EXIT
aarch64-linux-gnu-objdump -d -C --no-show-raw-insn "$bin" >"$dis"
python3 - "$dis" <<'PY'
import re, sys
from collections import Counter

# (what, demangled name, fewest vector FP instructions, most scalar FP ones, most q-register
# stores to the stack); measured: vector / scalar / stores.
CHECKS = [
    # F(2x2) and F(4x4) input transform, 4 lanes at a time in NEON intrinsics: 193 / 0 / 68 (the
    # stores are the 6 x 6 transposition, none a spill; at 16 lanes it was 216 / 0 / 99).
    ("Winograd input transform", "easel_vgg::simd::baseline::<easel_vgg::conv::winograd::transforms::InputTransform>", 160, 8, 90),
    # Output transform: 136 / 0 / 24.
    ("Winograd output transform", "easel_vgg::simd::baseline::<easel_vgg::conv::winograd::transforms::OutputTransform>", 110, 8, 40),
    # ReLU mask, with and without the gated add: 16 / 10 / 0 (the 10 are the ragged ends).
    ("ReLU mask apply (gated add)", "easel_vgg::simd::baseline::<easel_vgg::relu_mask::ApplyMask>", 16, 12, 4),
    # Bit packing of the ReLU outputs (fcmgt): 18 / 1 / 19.
    ("ReLU mask bit packing", "easel_vgg::simd::baseline::<easel_vgg::relu_mask::PackBits>", 16, 4, 30),
    # Bias and bias+ReLU epilogue (fadd, fmax): 6 / 3 / 0.
    ("bias/ReLU epilogue", "<easel_vgg::conv::epilogue::Epilogue>::apply", 4, 4, 4),
    # gemm's f32 microkernels (12x4 and 16x4 tiles): 238 / 5 / 6 and 314 / 5 / 8.
    ("gemm f32 microkernel 12x4", "gemm_f32::microkernel::neon::f32::x3x4", 200, 8, 12),
    ("gemm f32 microkernel 16x4", "gemm_f32::microkernel::neon::f32::x4x4", 270, 8, 12),
]

VECTOR = re.compile(r"\bv\d+\.\d*[bhsd]\b")
SCALAR = re.compile(r"^[hsd]\d+$")
STACK_STORE = re.compile(r"\bq\d+\b.*\[(sp|x29)\b")

functions = {}
current = None
for line in open(sys.argv[1]):
    m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
    if m:
        current = functions.setdefault(m.group(1), Counter())
        continue
    parts = line.rstrip("\n").split("\t")
    if current is None or len(parts) < 3:
        continue
    mnemonic, operands = parts[1].strip(), parts[2]
    if mnemonic.startswith("f") and mnemonic != "fmov":
        if VECTOR.search(operands):
            current["vector"] += 1
        elif SCALAR.match(operands.split(",")[0].strip()):
            current["scalar"] += 1
    if mnemonic in ("str", "stp", "stur") and STACK_STORE.search(operands):
        current["stack"] += 1

failures = []
print(f"{'function':32} {'vector':>7} {'scalar':>7} {'stack':>6}   thresholds")
for what, name, min_vector, max_scalar, max_stack in CHECKS:
    c = functions.get(name)
    if c is None:
        failures.append(f"{what}: no function {name} (inlined, renamed, or not built with v0 mangling?)")
        continue
    print(f"{what:32} {c['vector']:7} {c['scalar']:7} {c['stack']:6}   >= {min_vector}, <= {max_scalar}, <= {max_stack}")
    if c["vector"] < min_vector:
        failures.append(f"{what}: {c['vector']} vector FP instructions, fewer than {min_vector}")
    if c["scalar"] > max_scalar:
        failures.append(f"{what}: {c['scalar']} scalar FP instructions, more than {max_scalar}")
    if c["stack"] > max_stack:
        failures.append(f"{what}: {c['stack']} vector stores to the stack, more than {max_stack}")
for f in failures:
    print("neon-check:", f, file=sys.stderr)
sys.exit(1 if failures else 0)
PY
