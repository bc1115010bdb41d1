#!/usr/bin/env bash
# Builds easel with `--features cuda` on a machine without a CUDA toolkit: nvcc, the CUDA
# headers and (for --link) the CUDA libraries come from NVIDIA's PyPI wheels, installed once
# into a cache folder and reused. See deploy/cuda.md.
#
#   deploy/cuda-build.sh [--check | --link [--smoke] [--tests]] [extra cargo arguments]
#
#   --check  (default) `cargo check --release --features cuda`: candle's CUDA kernels are
#            compiled by nvcc (its build script runs under check too) and every easel crate is
#            type-checked against cudarc, but nothing is linked, so no CUDA library is needed.
#   --link   `cargo build --release --features cuda`: the easel binary, linked against the
#            wheels' cuBLAS, cuRAND, NVRTC and CUDA runtime and, where no NVIDIA driver is
#            installed, a link stub of the driver's libcuda.so.1 (see below).
#   --smoke  after --link, runs the binary: with the stub (no driver), a job under the default
#            `model.device = "auto"` must run on the CPU and `device = "cuda"` must fail with a
#            one-line error naming the key; with a driver, `auto` must pick cuda:0.
#   --tests  after --link, also builds the golden test binaries with `--features cuda` (the
#            engine's goldens and easel-vgg's gradient check, `cargo test --no-run`) and prints
#            their paths: run them with EASEL_TEST_DEVICE=cuda on a machine with a GPU.
#
# Environment:
#   EASEL_CUDA_CACHE   where the wheels go (default ~/.cache/easel-cuda)
#   EASEL_CUDA_ROOT    a CUDA toolkit to use instead of the wheels (e.g. JetPack's /usr/local/cuda,
#                      used by default when it has bin/nvcc)
#   CUDA_COMPUTE_CAP   the GPU's compute capability without the dot: 87 for a Jetson Orin, 90
#                      for an H100/H200 (default: nvidia-smi's answer, else 80, whose PTX the
#                      driver compiles for any newer GPU when it loads)
#   CARGO_TARGET_DIR   as for cargo (the binary is $CARGO_TARGET_DIR/release/easel)
#
# After --link, the script prints the LD_LIBRARY_PATH the binary needs on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=check
smoke=no
tests=no
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check; shift ;;
    --link) mode=link; shift ;;
    --smoke) smoke=yes; shift ;;
    --tests) tests=yes; shift ;;
    -h | --help) sed -n '2,31p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ "$smoke" = yes ] && [ "$mode" != link ]; then
  echo "cuda-build: --smoke runs the linked binary: it needs --link" >&2
  exit 2
fi
if [ "$tests" = yes ] && [ "$mode" != link ]; then
  echo "cuda-build: --tests links test binaries: it needs --link" >&2
  exit 2
fi

cache="${EASEL_CUDA_CACHE:-$HOME/.cache/easel-cuda}"
mkdir -p "$cache"

# The wheels, pinned: cudarc 0.19.10 (through candle 0.11.1) knows CUDA up to 13.4, and a
# toolkit it has not seen is refused at build time; pinning keeps CI from meeting a new one.
check_wheels=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cuda-cccl==13.3.5.0.6)
link_wheels=(nvidia-cublas==13.10.0.20 nvidia-cuda-nvrtc==13.5.37 nvidia-curand==10.4.4.72)

elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

# Installs `$@` with pip into $cache/py unless a previous run did (a stamp lists what is there).
install_wheels() {
  local stamp="$cache/py/.easel-installed" missing=()
  for w in "$@"; do
    grep -qxF "$w" "$stamp" 2>/dev/null || missing+=("$w")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "installing pip (apt-get)" >&2
    apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
  fi
  local started
  started=$(date +%s)
  echo "cuda-build: pip install $* into $cache/py" >&2
  # --target also skips Debian's externally-managed-environment guard: nothing system-wide
  # changes. All the wheels go in one call, with --upgrade: pip replaces a target's top-level
  # folder (nvidia/) whole, so installing only the missing ones would drop the others.
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --upgrade --target "$cache/py" "$@"
  printf '%s\n' "$@" >>"$stamp"
  echo "cuda-build: wheels installed in $(elapsed "$started"), $(du -sh "$cache/py" | cut -f1) on disk" >&2
}

if [ -n "${EASEL_CUDA_ROOT:-}" ] || [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda_root="${EASEL_CUDA_ROOT:-/usr/local/cuda}"
  echo "cuda-build: using the CUDA toolkit in $cuda_root" >&2
  wheels=no
else
  if [ "$mode" = link ]; then
    install_wheels "${check_wheels[@]}" "${link_wheels[@]}"
  else
    install_wheels "${check_wheels[@]}"
  fi
  cuda_root="$cache/py/nvidia/cu13"
  wheels=yes
fi
[ -x "$cuda_root/bin/nvcc" ] || { echo "cuda-build: no nvcc in $cuda_root/bin" >&2; exit 1; }

export PATH="$cuda_root/bin:$PATH"
# cudarc's and candle's build scripts look for the toolkit under these names.
export CUDA_ROOT="$cuda_root" CUDA_HOME="$cuda_root" CUDA_PATH="$cuda_root"

release=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r cuda_major cuda_minor <<<"$release"
if [ -z "${CUDARC_CUDA_VERSION:-}" ] && [ "$cuda_major" -eq 13 ] && [ "$cuda_minor" -gt 4 ]; then
  # The CUDA 13 driver API is stable within the major version; 13.4's bindings call 13.5's driver.
  export CUDARC_CUDA_VERSION=13040
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sed -n 1p | tr -d '.' || true)
  export CUDA_COMPUTE_CAP="${cap:-80}"
fi
echo "cuda-build: nvcc $cuda_major.$cuda_minor, compute capability $CUDA_COMPUTE_CAP," \
  "cudarc bindings ${CUDARC_CUDA_VERSION:-from nvcc}" >&2

# Library folder for the linker: the wheels carry only versioned names (libcublas.so.13), and
# `-lcublas` wants libcublas.so.
link_dir="$cache/link"
if [ "$mode" = link ]; then
  mkdir -p "$link_dir"
  for lib in cublas cublasLt curand nvrtc cudart; do
    found=$(find -L "$cuda_root" -maxdepth 2 -name "lib$lib.so*" 2>/dev/null | sort | sed -n 1p)
    if [ -z "$found" ]; then
      echo "cuda-build: lib$lib.so not found under $cuda_root" >&2
      exit 1
    fi
    ln -sf "$found" "$link_dir/lib$lib.so"
  done
  # grep reads all of ldconfig's output: with -q it could stop early and, under pipefail, the
  # writer's SIGPIPE would read as "no driver".
  if ldconfig -p 2>/dev/null | grep 'libcuda\.so\.1 ' >/dev/null; then
    echo "cuda-build: linking against this machine's NVIDIA driver (libcuda.so.1)" >&2
    rm -f "$link_dir/libcuda.so" "$link_dir/libcuda.so.1"
  else
    # No driver here: link against a stub with the driver's soname, libcuda.so.1. At run time
    # the real driver's library is found instead; with only the stub (LD_LIBRARY_PATH), every
    # call fails with CUDA_ERROR_NO_DEVICE, so `auto` falls back to the CPU. Its symbols are
    # every driver function cudarc declares, so the link does not depend on which ones candle
    # happens to call.
    cudarc_src=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
      python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
    stub_c="$link_dir/libcuda-stub.c"
    {
      echo '/* Generated by deploy/cuda-build.sh: a stand-in for the NVIDIA driver library. */'
      echo 'static const char *const message = "no NVIDIA driver: this libcuda.so.1 is a link stub made by deploy/cuda-build.sh";'
      echo 'int cuGetErrorString(int error, const char **text) { (void)error; *text = message; return 0; }'
      echo 'int cuGetErrorName(int error, const char **text) { (void)error; *text = "CUDA_ERROR_NO_DEVICE"; return 0; }'
      grep -ohE 'pub (unsafe )?fn cu[A-Z][A-Za-z0-9_]*' "$cudarc_src"/src/driver/sys/*.rs | awk '{print $NF}' | sort -u |
        grep -vxE 'cuGetErrorString|cuGetErrorName' |
        # 100 is CUDA_ERROR_NO_DEVICE; every driver API function returns a CUresult.
        sed 's/.*/int &(void) { return 100; }/'
    } >"$stub_c"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$link_dir/libcuda.so.1" "$stub_c"
    ln -sf libcuda.so.1 "$link_dir/libcuda.so"
    echo "cuda-build: no NVIDIA driver here; linking against a stub libcuda.so.1" \
      "($(grep -c '^int' "$stub_c") functions)" >&2
  fi
  export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi

# Runs the linked binary on the sample images with synthetic weights (see --smoke).
smoke_test() {
  local easel="$1" tmp out
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  export LD_LIBRARY_PATH="$2${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local job=(--content tests/data/content.png --style tests/data/style.png --weights "$tmp/w.safetensors"
    --size 32 --iterations 2 --optimizer adam --json)
  "$easel" weights synth --seed 0 --out "$tmp/w.safetensors" >/dev/null
  out=$("$easel" bench "${job[@]}" 2>"$tmp/auto.log")
  if [ -f "$link_dir/libcuda.so.1" ]; then
    grep -q '"device":"cpu"' <<<"$out" || { echo "smoke: auto did not run on the CPU: $out" >&2; exit 1; }
    grep -q 'using the CPU (no CUDA: no CUDA device 0 answered' "$tmp/auto.log" ||
      { echo "smoke: auto did not say why it chose the CPU:" >&2; cat "$tmp/auto.log" >&2; exit 1; }
    printf '[model]\ndevice = "cuda"\n' >"$tmp/cuda.toml"
    if "$easel" bench --config "$tmp/cuda.toml" "${job[@]}" >/dev/null 2>"$tmp/cuda.log"; then
      echo "smoke: device = \"cuda\" ran without a GPU" >&2; exit 1
    fi
    if ! grep -qx 'error: model.device = "cuda": no CUDA device 0 answered: .*CUDA_ERROR_NO_DEVICE.*' "$tmp/cuda.log" ||
      [ "$(wc -l <"$tmp/cuda.log")" -ne 1 ]; then
      echo "smoke: device = \"cuda\" did not fail with one clear line:" >&2; cat "$tmp/cuda.log" >&2; exit 1
    fi
    echo "cuda-build: smoke test passed: without a GPU, auto runs on the CPU and device = \"cuda\" says:" >&2
    echo "  $(cat "$tmp/cuda.log")" >&2
  else
    grep -q '"device":"cuda:0"' <<<"$out" || { echo "smoke: auto did not pick cuda:0: $out" >&2; exit 1; }
    echo "cuda-build: smoke test passed: auto runs on cuda:0" >&2
  fi
}

# The golden test binaries, built with CUDA; their paths are printed, one a line, on stdout.
build_tests() {
  local started
  started=$(date +%s)
  # `--message-format json` names each test executable; cargo's own progress stays on stderr.
  cargo test --release --features cuda --no-run -p easel-engine -p easel-vgg --test golden --test backward \
    --message-format json "${cargo_args[@]}" | deploy/test-executables.py >"$target/cuda-golden-tests.txt"
  echo "cuda-build: golden test binaries built with CUDA in $(elapsed "$started"); run each with" >&2
  echo "  EASEL_TEST_DEVICE=cuda LD_LIBRARY_PATH=$1 BINARY" >&2
  echo "  (they read tests/data from the checkout they were built in, $PWD, or from EASEL_TEST_DATA;" >&2
  echo "  deploy/gpu-check.sh packs them for another machine and runs them there)" >&2
  cat "$target/cuda-golden-tests.txt"
}

cargo_args=("$@")
started=$(date +%s)
if [ "$mode" = link ]; then
  cargo build --release --features cuda "$@"
  echo "cuda-build: cargo build --release --features cuda took $(elapsed "$started")" >&2
  target="${CARGO_TARGET_DIR:-target}"
  runtime="$link_dir"
  [ "$wheels" = yes ] && runtime="$link_dir:$(dirname "$(readlink -f "$link_dir/libcublas.so")")"
  echo "cuda-build: built $target/release/easel; it loads its CUDA libraries with" >&2
  echo "  LD_LIBRARY_PATH=$runtime" >&2
  # `if`, not `&&`: the script's status is its last command's, and a skipped step is no failure.
  if [ "$smoke" = yes ]; then smoke_test "$target/release/easel" "$runtime"; fi
  if [ "$tests" = yes ]; then build_tests "$runtime"; fi
else
  cargo check --release --features cuda "$@"
  echo "cuda-build: cargo check --release --features cuda took $(elapsed "$started")" >&2
fi
