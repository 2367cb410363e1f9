#!/usr/bin/env bash
# The GPU check of issue 21, in one call of the device tool (bench/gpu/README.md says how):
#     bash bench/gpu/run.sh            from the repository's root, with .gpu/ (prepare.sh) carried
# Builds llama.cpp with CUDA for sm_90 from the source the installed llama-cpp-python vendors
# (llama-server, llama-bench, libllama and libggml*, which llama-cpp-python loads through
# LLAMA_CPP_LIB_PATH), writes models of SmolLM2-135M's shape (and Llama-3.2-1B's, if time is
# left) with random Q8_0 weights, then measures on the GPU:
#   a. llama-bench, -ngl 99 (the engine's roof); CPU only too with KIT_CPU_BENCH=1
#   b. llama-cpp-python's own Llama in process (n_gpu_layers=-1, n_ctx 2048, flash_attn)
#   c. myllm's daemon (MYLLM_NUM_GPU=-1: every layer that fits, which is all of them here)
#      against llama-server -ngl 99 -np 4 -c 8192, one client for both, A B A B: decode single
#      stream, time to first token, aggregate decode with 4 and 16 clients; myllm's /api/ps and
#      /status are recorded, and the report says whether decode reached 0.9x llama-server's
#   d. c again for the 1B shape, if more than 120 s remain
# Writes to $OUT: run.log, build.log, llama_server.log, myllm.log, gpu_results.md, gpu_results.json.
# The whole run keeps to KIT_BUDGET seconds (default 510); the build (configure + compile) to
# KIT_BUILD_LIMIT (default 360), past which the rest is skipped and the results say why.
#
# Knobs for testing elsewhere (the defaults are the device run): KIT_NO_CUDA=1 (CPU build),
# KIT_BIN=DIR (skip the build, use DIR's llama-server/llama-bench/libllama.so),
# KIT_CONFIGURE_ONLY=1, KIT_EXTRA_LIB_DIRS="DIR ..." (more places to look for cuBLAS/libcuda),
# KIT_TARGETS, KIT_JOBS, KIT_SKIP_1B=1, KIT_CPU_BENCH=1, KIT_ROUNDS, KIT_THREADS, KIT_CPU_THREADS,
# KIT_BENCH_ARGS.
set -u -o pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPTS/../.." && pwd)"
KIT="$REPO/.gpu"   # what prepare.sh made: wheels, llama.cpp's source, the model's metadata
OUT="${OUT:-/tmp/gpukit-out}"
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET=${KIT_BUDGET:-510}
BUILD_LIMIT=${KIT_BUILD_LIMIT:-360}
WORK=${KIT_WORK:-/tmp/gpukit}
SITE=${KIT_SITE:-/tmp/site}
LLSRC=${KIT_LLSRC:-/tmp/llsrc}
BUILD=${KIT_BUILD:-$WORK/build}
JOBS=${KIT_JOBS:-16}
NPROC=$(nproc)
THREADS=${KIT_THREADS:-$(( NPROC / 2 > 0 ? NPROC / 2 : 1 ))}   # llama-server -t and MYLLM_NUM_THREADS alike
CPU_THREADS=${KIT_CPU_THREADS:-16}                               # the CPU-only llama-bench
ROUNDS=${KIT_ROUNDS:-2}
read -r -a BENCH_ARGS <<< "${KIT_BENCH_ARGS:--p 512 -n 128 -r 3}"   # llama-bench test sizes

export HF_HUB_OFFLINE=1   # nothing outside the machine can be reached
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
say() { printf '\n[%4ds] == %s\n' "$(el)" "$*"; }
# cap a step's timeout at the time left less a reserve: cap WANT [RESERVE]; never 0 (timeout 0 = no limit)
cap() { local want=$1 reserve=${2:-12} l; l=$(( $(left) - reserve )); (( l < want )) && want=$l; (( want < 1 )) && want=1; echo "$want"; }
note() { echo "$*" >> "$WORK/notes.txt"; echo "NOTE: $*"; }

PIDS=()
stop_pid() {  # TERM, up to 8 s, then KILL; by PID only
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  command -v pkill > /dev/null && pkill -TERM -P "$pid" 2>/dev/null
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null
  return 0
}
report() {
  python3 "$SCRIPTS/bench.py" report "$WORK" --md "$OUT/gpu_results.md" --json "$OUT/gpu_results.json" > /dev/null 2>&1 || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  report
  say "done in $(el) s; results in $OUT/gpu_results.md"
  [ -f "$OUT/gpu_results.md" ] && cat "$OUT/gpu_results.md"
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 143' TERM INT

rm -rf "$WORK"; mkdir -p "$WORK/models" "$WORK/small"
: > "$WORK/notes.txt"
meta() { python3 - "$WORK/meta.json" "$1" "$2" <<'EOF'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]); d = json.loads(p.read_text()) if p.exists() else {}
d[sys.argv[2]] = sys.argv[3]; p.write_text(json.dumps(d, indent=1))
EOF
}

# ---------------------------------------------------------------------------------------------
say "machine"
echo "nproc: $NPROC"
timeout 20 nvidia-smi || echo "nvidia-smi failed"
GPU=$(timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
python3 -V; cmake --version | head -1; echo "ninja $(ninja --version 2>/dev/null)"
free -g | head -2; df -h /tmp | tail -1
python3 -m pip list 2>/dev/null | grep -i -E '^(typing.extensions|anyio|click|h11|huggingface.hub|typer|rich|httpx|numpy|jinja2|psutil|uvloop|pyyaml|tqdm|requests|markupsafe|annotated.doc|torch) ' || true
meta gpu "${GPU:-none}"; meta nproc "$NPROC"; meta python "$(python3 -V 2>&1)"; meta started "$(date -u +%FT%TZ)"

# ---------------------------------------------------------------------------------------------
say "source into $LLSRC"
rm -rf "$LLSRC"; mkdir -p "$LLSRC"
tar -xzf "$KIT/llama_src.tar.gz" -C "$LLSRC" || { note "could not unpack .gpu/llama_src.tar.gz: run bench/gpu/prepare.sh and carry .gpu"; exit 1; }

# ---------------------------------------------------------------------------------------------
CMAKE_EXTRA=()
cuda_setup() {
  local c t
  NVCC=""
  for c in "${CUDACXX:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" /usr/local/cuda/bin/nvcc \
           $(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V -r) "$(command -v nvcc 2>/dev/null)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    # a wrapper script (such as /usr/local/bin/nvcc: exec /usr/local/cuda-13.0/bin/nvcc "$@"): its target
    if [ "$(head -c 2 "$c")" = '#!' ]; then t=$(grep -o '/[^ "]*/bin/nvcc' "$c" | head -1); [ -n "$t" ] && [ -x "$t" ] && c=$t; fi
    NVCC=$(readlink -f "$c"); break
  done
  [ -n "$NVCC" ] || { note "nvcc not found"; return 1; }
  CUDA_ROOT=$(dirname "$(dirname "$NVCC")")
  echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"; echo "CUDA root: $CUDA_ROOT"
  meta nvcc "$("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*')"
  # Library folders: the toolkit's, the pip wheels' (torch's nvidia-cublas puts cuBLAS in
  # site-packages/nvidia/cu13/lib with no unversioned .so), the driver's.
  local pylibs
  pylibs=$(python3 - <<'EOF'
import glob, site, sys
roots = []
for p in list(sys.path) + site.getsitepackages():
    if p and p.rstrip("/").endswith(("site-packages", "dist-packages")) and p not in roots:
        roots.append(p)
print(" ".join(d for r in roots for d in sorted(glob.glob(r + "/nvidia/*/lib")) + sorted(glob.glob(r + "/nvidia/lib"))))
EOF
)
  local toolkit="$CUDA_ROOT/lib64 $CUDA_ROOT/lib $CUDA_ROOT/targets/x86_64-linux/lib"
  local driver="/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib"
  local stubs="$CUDA_ROOT/lib64/stubs $CUDA_ROOT/targets/x86_64-linux/lib/stubs"
  findlib() {  # findlib NAME DIRS... -> first lib<NAME>.so or lib<NAME>.so.<N> found
    local n=$1 d f; shift
    for d in "$@"; do for f in "$d/lib$n.so" "$d"/lib"$n".so.[0-9]*; do [ -e "$f" ] && { echo "$f"; return 0; }; done; done
    return 1
  }
  LIBDIR="$WORK/cudalib"; mkdir -p "$LIBDIR"
  link_as() {  # link_as NAME FILE: LIBDIR/libNAME.so and libNAME.so.<major> -> FILE
    local real soname
    real=$(readlink -f "$2")
    ln -sf "$real" "$LIBDIR/lib$1.so"
    soname=$(basename "$2" | grep -o "lib$1\.so\.[0-9]*" | head -1)
    [ -z "$soname" ] && soname=$(ls "$(dirname "$real")"/lib"$1".so.[0-9]* 2>/dev/null | head -1 | xargs -r basename | grep -o "lib$1\.so\.[0-9]*")
    [ -n "$soname" ] && ln -sf "$real" "$LIBDIR/$soname"
    echo "$LIBDIR/lib$1.so"
  }
  local cublas cublaslt cuda inc
  if [ -e "$CUDA_ROOT/lib64/libcublas.so" ] || [ -e "$CUDA_ROOT/targets/x86_64-linux/lib/libcublas.so" ]; then
    echo "cuBLAS: in the toolkit"
  else
    # shellcheck disable=SC2086
    cublas=$(findlib cublas $toolkit $pylibs ${KIT_EXTRA_LIB_DIRS:-} $driver) ||
      cublas=$(find /usr /opt -name 'libcublas.so*' -not -name '*.a' 2>/dev/null | grep -v stubs | head -1)
    [ -n "$cublas" ] || { note "cuBLAS not found: ggml-cuda cannot be built"; return 1; }
    cublaslt=$(findlib cublasLt "$(dirname "$cublas")") || { note "cublasLt not beside $cublas"; return 1; }
    echo "cuBLAS: $cublas and $cublaslt"
    CMAKE_EXTRA+=("-DCUDA_cublas_LIBRARY=$(link_as cublas "$cublas")" "-DCUDA_cublasLt_LIBRARY=$(link_as cublasLt "$cublaslt")")
    if [ ! -e "$CUDA_ROOT/include/cublas_v2.h" ]; then
      inc="$(dirname "$(dirname "$cublas")")/include"
      [ -e "$inc/cublas_v2.h" ] || inc=$(find "$(dirname "$(dirname "$(dirname "$cublas")")")" /usr/include /usr/local/include -name cublas_v2.h 2>/dev/null | head -1 | xargs -r dirname)
      [ -n "$inc" ] && [ -e "$inc/cublas_v2.h" ] || { note "cublas_v2.h not found"; return 1; }
      echo "cuBLAS headers: $inc"
      CMAKE_EXTRA+=("-DCMAKE_CUDA_FLAGS=-I$inc")
    fi
    meta cublas "$cublas"
  fi
  # The driver library for CUDA::cuda_driver (ggml-cuda's VMM pool); without one, no VMM.
  # shellcheck disable=SC2086
  if cuda=$(findlib cuda ${KIT_EXTRA_LIB_DIRS:-} $driver $stubs) || cuda=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}' | grep .); then
    echo "libcuda: $cuda"
    case "$cuda" in *.so) CMAKE_EXTRA+=("-DCUDA_cuda_driver_LIBRARY=$cuda") ;; *) CMAKE_EXTRA+=("-DCUDA_cuda_driver_LIBRARY=$(link_as cuda "$cuda")") ;; esac
  else
    note "libcuda not found at build time: building with GGML_CUDA_NO_VMM=ON"
    CMAKE_EXTRA+=("-DGGML_CUDA_NO_VMM=ON")
  fi
  # cudart is linked from the toolkit's own folder, which CMake leaves out of the RUNPATH
  export LD_LIBRARY_PATH="$LIBDIR:$CUDA_ROOT/lib64:$CUDA_ROOT/lib:$CUDA_ROOT/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  CMAKE_EXTRA+=("-DGGML_CUDA=ON" "-DCMAKE_CUDA_ARCHITECTURES=90" "-DCMAKE_CUDA_COMPILER=$NVCC" "-DCUDAToolkit_ROOT=$CUDA_ROOT"
                "-DGGML_CUDA_NCCL=OFF" "-DGGML_CUDA_COMPRESSION_MODE=none" "-DGGML_CUDA_FA_QUANTS=f16-f16")
  return 0
}

BIN=""; BUILD_PID=""
if [ -n "${KIT_BIN:-}" ]; then
  BIN=$KIT_BIN
  note "using prebuilt binaries from $BIN (KIT_BIN); no build"
else
  say "configure (CUDA) -> $BUILD"
  B0=$(date +%s)
  OK=1
  if [ "${KIT_NO_CUDA:-0}" = 1 ]; then note "KIT_NO_CUDA=1: CPU-only build"; else cuda_setup || OK=0; fi
  if [ $OK = 1 ]; then
    timeout "$(cap 120)" cmake -S "$LLSRC/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF "${CMAKE_EXTRA[@]}" > "$OUT/build.log" 2>&1 \
      || { OK=0; tail -40 "$OUT/build.log"; note "cmake configure failed (build.log)"; }
  fi
  CONF_S=$(( $(date +%s) - B0 ))
  grep -E 'CUDA Toolkit found|CMAKE_CUDA_ARCHITECTURES|Including CUDA backend|CUDA host compiler|cuBLAS|VMM' "$OUT/build.log" || true
  echo "configure took $CONF_S s"
  [ "${KIT_CONFIGURE_ONLY:-0}" = 1 ] && { say "configure only (KIT_CONFIGURE_ONLY=1)"; exit 0; }
  if [ $OK = 1 ]; then
    TARGETS=${KIT_TARGETS:-"llama-server llama-bench llama"}
    LIMIT=$(cap $(( BUILD_LIMIT - CONF_S )) 60)
    say "build $TARGETS with -j $JOBS in the background (limit ${LIMIT} s)"
    # shellcheck disable=SC2086
    ( timeout "$LIMIT" cmake --build "$BUILD" --target $TARGETS -j "$JOBS" >> "$OUT/build.log" 2>&1; echo $? > "$WORK/build.rc" ) &
    BUILD_PID=$!; PIDS+=("$BUILD_PID")
    BIN="$BUILD/bin"
  fi
fi

# ---------------------------------------------------------------------------------------------
say "python packages from .gpu/whl into $SITE"
rm -rf "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$KIT"/whl/*.whl \
  || echo "pip install failed"
export PYTHONPATH="$SITE:$LLSRC:$REPO${PYTHONPATH:+:$PYTHONPATH}"
IMPORTS='import fastapi, starlette, pydantic, pydantic_settings, sqlalchemy, alembic, mako, uvicorn, httptools, gguf, diskcache, opentelemetry.trace, typer, rich, httpx, jinja2, psutil, numpy'
if ! python3 -c "$IMPORTS" 2>"$WORK/import.err"; then
  cat "$WORK/import.err"
  if [ -d "$KIT/whl-fallback" ] && ls "$KIT"/whl-fallback/*.whl > /dev/null 2>&1; then
    note "imports failed with the machine's own packages; adding .gpu/whl-fallback ($(ls "$KIT"/whl-fallback | tr '\n' ' '))"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site-fallback" "$KIT"/whl-fallback/*.whl
    export PYTHONPATH="$SITE:$WORK/site-fallback:$LLSRC:$REPO${PYTHONPATH#$SITE:$LLSRC:$REPO}"
    python3 -c "$IMPORTS" || note "imports still fail: myllm will not start"
  fi
fi

say "models in the background (make_model.py, niced)"
(
  MODEL_META=(--meta "$KIT/model_meta.gguf" --tensors "$KIT/model_tensors.json")
  nice -n 5 python3 "$SCRIPTS/make_model.py" "$WORK/models/small.gguf" "${MODEL_META[@]}" &&
  if [ "${KIT_SKIP_1B:-0}" != 1 ]; then nice -n 5 python3 "$SCRIPTS/make_model.py" "$WORK/models/m1b.gguf" --scale 1b "${MODEL_META[@]}"; fi
) > "$WORK/make_model.log" 2>&1 &
MM_PID=$!; PIDS+=("$MM_PID")

if [ -n "$BUILD_PID" ]; then
  say "waiting for the build"
  n=0
  while kill -0 "$BUILD_PID" 2>/dev/null; do
    sleep 1; n=$(( n + 1 ))
    (( n % 30 == 0 )) && printf '[%4ds] build %s\n' "$(el)" "$(grep -oE '^\[[0-9]+/[0-9]+\]' "$OUT/build.log" | tail -1)"
  done
  RC=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
  BUILD_S=$(( $(date +%s) - B0 ))
  meta build_seconds "$BUILD_S (configure $CONF_S s + compile, -j $JOBS, $NPROC CPUs)"
  grep -E '^\[[0-9]+/[0-9]+\]' "$OUT/build.log" | tail -2
  if [ "$RC" = 0 ]; then echo "build OK in $BUILD_S s (configure $CONF_S s)"
  elif [ "$RC" = 124 ]; then note "build passed its limit ($BUILD_S s; limit $BUILD_LIMIT s including configure) and was stopped after $(grep -oE '^\[[0-9]+/[0-9]+\]' "$OUT/build.log" | tail -1) steps; the rest is skipped"
  else tail -40 "$OUT/build.log"; note "build failed (rc $RC, see build.log)"; fi
fi

HAVE_LIB=0; HAVE_BENCH=0; HAVE_SERVER=0
if [ -n "$BIN" ]; then
  [ -e "$BIN/libllama.so" ] && HAVE_LIB=1
  [ -x "$BIN/llama-bench" ] && HAVE_BENCH=1
  [ -x "$BIN/llama-server" ] && HAVE_SERVER=1
  ls -la "$BIN" 2>/dev/null | grep -v ' -> ' | grep -E 'llama|ggml|mtmd' || true
fi
meta built "libllama=$HAVE_LIB llama-bench=$HAVE_BENCH llama-server=$HAVE_SERVER"
if [ -n "$BIN" ] && [ -e "$BIN/libggml-cuda.so" ]; then
  echo "libggml-cuda.so links:"; ldd "$BIN/libggml-cuda.so" | grep -E 'cuda|cublas|not found' || true
  ldd "$BIN/libggml-cuda.so" | grep -q 'not found' && note "libggml-cuda.so has unresolved libraries: $(ldd "$BIN/libggml-cuda.so" | grep 'not found' | tr -s ' \t' ' ' | tr '\n' ';')"
elif [ "${KIT_NO_CUDA:-0}" != 1 ] && [ -n "$BIN" ]; then
  note "no libggml-cuda.so in $BIN: not a CUDA build"
fi
if [ $HAVE_LIB = 0 ]; then note "no libllama.so: nothing to measure"; exit 0; fi

# llama-cpp-python finds its library through LLAMA_CPP_LIB_PATH (llama_cpp/llama_cpp.py loads
# $LLAMA_CPP_LIB_PATH/libllama.so); libllama.so finds libggml*.so through its build RUNPATH and
# LD_LIBRARY_PATH. llama_cpp/lib -> bin as well, for the modules that look only there (_ggml, mtmd).
export LLAMA_CPP_LIB_PATH="$BIN"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ln -sfn "$BIN" "$LLSRC/llama_cpp/lib"
python3 -c 'import llama_cpp, sys; print("llama_cpp", llama_cpp.__version__, "from", llama_cpp.__file__, "lib", llama_cpp.llama_cpp._lib._name, "gpu offload:", bool(llama_cpp.llama_supports_gpu_offload()))' \
  | tee "$WORK/llama_cpp_check.txt" || note "llama_cpp does not import with the built library"
grep -q 'gpu offload: True' "$WORK/llama_cpp_check.txt" 2>/dev/null || note "llama_cpp reports no GPU offload: its numbers are CPU numbers"
meta llama_cpp "$(cat "$WORK/llama_cpp_check.txt" 2>/dev/null)"

HAVE_MYLLM=0
if python3 -c 'import myllm.api.app, cli.main' 2>&1; then HAVE_MYLLM=1; else note "myllm does not import (see above)"; fi
meta myllm_source "$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$( [ -n "$(git -C "$REPO" status --porcelain -- myllm cli 2>/dev/null)" ] && echo ' (with uncommitted changes)'); .gpu prepared at $(cat "$KIT/SOURCE_COMMIT" 2>/dev/null || echo unknown)"
python3 -m myllm.runtime.devices > "$WORK/devices.json" 2>> "$OUT/myllm.log" && meta myllm_devices "$(cat "$WORK/devices.json")" \
  || note "myllm's GPU probe failed (myllm.log)"
grep -q '"offload": true' "$WORK/devices.json" 2>/dev/null || note "myllm's probe finds no GPU: myllm would run on the CPU"
meta servers "llama-server -ngl 99 -np 4 -c 8192 -t $THREADS; myllm serve with MYLLM_NUM_GPU=-1 (every layer that fits) MYLLM_NUM_PARALLEL=4 MYLLM_NUM_CTX=2048 MYLLM_NUM_THREADS=$THREADS, other settings default"
MYLLM=(python3 -c 'import sys; from cli.main import main; sys.argv[0] = "myllm"; main()')   # the console script, without installing

wait_model() {  # wait_model PATH: the generator writes the small model first, then the 1b one
  local f=$1 i
  for i in $(seq 1 "$(cap 90)"); do
    grep -qF "wrote $f:" "$WORK/make_model.log" 2>/dev/null && return 0
    kill -0 "$MM_PID" 2>/dev/null || break
    sleep 1
  done
  grep -qF "wrote $f:" "$WORK/make_model.log" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
run_bench() {  # run_bench MODEL OUTJSON TIMEOUT ENV ARGS... (ENV: VAR=VALUE or -; llama-bench -o json, summarised)
  local model=$1 out=$2 to=$3 envspec=$4; shift 4
  (( to < 10 )) && { note "no time left for llama-bench $*"; return 1; }
  [ "$envspec" = - ] && envspec="KIT_BENCH=1"
  echo "+ $envspec llama-bench -m $(basename "$model") $*  (timeout $to s)"
  env "$envspec" timeout "$to" "$BIN/llama-bench" -m "$model" "$@" -o json > "$out.tmp" 2> "$out.err"
  local rc=$?
  if [ $rc = 0 ]; then mv "$out.tmp" "$out"
    python3 - "$out" <<'EOF'
import json, sys
for t in json.load(open(sys.argv[1])):
    test = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
    print(f"  {t.get('model_type')} | {t.get('backends')} | ngl {t.get('n_gpu_layers')} | threads {t.get('n_threads')} | fa {t.get('flash_attn')} | {test}: {t['avg_ts']:.1f} +- {t['stddev_ts']:.1f} t/s")
EOF
  else tail -5 "$out.err"; note "llama-bench $* failed (rc $rc)"; fi
}

servers() {  # servers LABEL MODEL MYLLM_NAME
  local label=$1 model=$2 name=$3 p1 p2 ls_pid my_pid
  read -r p1 p2 < <(python3 "$SCRIPTS/bench.py" freeport 2)
  echo "+ llama-server on 127.0.0.1:$p1, myllm on 127.0.0.1:$p2"
  echo "==== $label $(date -u +%T) llama-server -m $model -ngl 99 -np 4 -c 8192 -t $THREADS --port $p1" >> "$OUT/llama_server.log"
  "$BIN/llama-server" -m "$model" -ngl 99 -np 4 -c 8192 -t "$THREADS" --host 127.0.0.1 --port "$p1" >> "$OUT/llama_server.log" 2>&1 &
  ls_pid=$!; PIDS+=("$ls_pid")
  local a_spec=""
  if [ $HAVE_MYLLM = 1 ]; then
    echo "==== $label $(date -u +%T) myllm serve --port $p2" >> "$OUT/myllm.log"
    export MYLLM_HOME="$WORK/myllm-home" MYLLM_NUM_CTX=2048 MYLLM_NUM_PARALLEL=4 MYLLM_NUM_THREADS="$THREADS" MYLLM_NUM_GPU=-1 \
           MYLLM_KEEP_ALIVE=-1 MYLLM_MAX_QUEUE=64 MYLLM_SHUTDOWN_GRACE=1
    timeout "$(cap 60)" "${MYLLM[@]}" pull "$model" --name "$name" >> "$OUT/myllm.log" 2>&1 \
      || note "$label: myllm pull failed (myllm.log)"
    # PYTHONFAULTHANDLER: a segfault in the daemon itself prints its Python traceback too
    # (the runners enable faulthandler on their own, and the daemon logs what they print).
    PYTHONFAULTHANDLER=1 MYLLM_OLLAMA_PORT=0 "${MYLLM[@]}" serve --host 127.0.0.1 --port "$p2" --log-level info >> "$OUT/myllm.log" 2>&1 &
    my_pid=$!; PIDS+=("$my_pid")
    a_spec="myllm=http://127.0.0.1:$p2@$name"
  fi
  local ok=1
  python3 "$SCRIPTS/bench.py" wait "http://127.0.0.1:$p1" --timeout "$(cap 60)" || { ok=0; note "$label: llama-server did not come up"; tail -20 "$OUT/llama_server.log"; }
  if [ -n "$a_spec" ]; then
    python3 "$SCRIPTS/bench.py" wait "http://127.0.0.1:$p2" --timeout "$(cap 60)" || { ok=0; note "$label: myllm did not come up"; tail -20 "$OUT/myllm.log"; }
  fi
  if [ $ok = 1 ]; then
    local budget; budget=$(cap 120 30)
    echo "+ bench.py servers (A = myllm, B = llama-server), $ROUNDS rounds, budget $budget s"
    timeout "$(cap $(( budget + 25 )) 8)" python3 "$SCRIPTS/bench.py" servers ${a_spec:+--a "$a_spec"} --b "llama-server=http://127.0.0.1:$p1@$name" \
      --rounds "$ROUNDS" --budget "$budget" --out "$WORK/$label/servers.json" || note "$label: server measurements ended early"
  fi
  stop_pid "$ls_pid"; [ -n "${my_pid:-}" ] && stop_pid "$my_pid"
  report
}

measure_model() {  # measure_model LABEL MODEL MYLLM_NAME FULL(1: a, b, c; 0: c first, then a-GPU and b if time)
  local label=$1 model=$2 name=$3 full=$4
  mkdir -p "$WORK/$label"
  python3 - "$WORK/$label/model.json" "$model" "$label" <<'EOF'
import json, os, sys
desc = {"small": "SmolLM2-135M-Instruct shape and metadata, random Q8_0 weights",
        "1b": "Llama-3.2-1B shape (2048 hidden, 16 layers, 32/8 heads, ff 8192), SmolLM2 vocab, random Q8_0 weights"}[sys.argv[3]]
json.dump({"path": sys.argv[2], "bytes": os.path.getsize(sys.argv[2]), "desc": desc}, open(sys.argv[1], "w"))
EOF
  if [ "$full" = 1 ]; then
    if [ $HAVE_BENCH = 1 ]; then
      say "a. llama-bench $label, GPU (-ngl 99)"
      run_bench "$model" "$WORK/$label/bench_gpu.json" "$(cap 45 110)" - -ngl 99 "${BENCH_ARGS[@]}"
      if [ "${KIT_CPU_BENCH:-0}" = 1 ] && (( $(left) > 150 )); then
        say "a. llama-bench $label, CPU only (-ngl 0 -t $CPU_THREADS, CUDA_VISIBLE_DEVICES='')"
        run_bench "$model" "$WORK/$label/bench_cpu.json" "$(cap 45 120)" CUDA_VISIBLE_DEVICES= -ngl 0 -t "$CPU_THREADS" "${BENCH_ARGS[@]}"
      fi
      report
    fi
    say "b. llama-cpp-python in process, $label"
    (( $(cap 45 85) < 10 )) && note "$label: little time left for the in-process run"
    timeout "$(cap 45 85)" python3 "$SCRIPTS/bench.py" inproc "$model" --out "$WORK/$label/inproc.json" \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); print({k: d.get(k) for k in ("decode_tps_best","decode_tps_median","load_s","gpu_offload_supported","lib")})' \
      || note "$label: in-process measurement failed or timed out"
    report
  fi
  if [ $HAVE_SERVER = 1 ]; then
    say "c. llama-server vs myllm, $label"
    servers "$label" "$model" "$name"
  else note "no llama-server binary: step c skipped"; fi
  if [ "$full" = 0 ]; then
    if [ $HAVE_BENCH = 1 ] && (( $(left) > 45 )); then
      say "a. llama-bench $label, GPU (-ngl 99)"
      run_bench "$model" "$WORK/$label/bench_gpu.json" "$(cap 40)" - -ngl 99 "${BENCH_ARGS[@]}"
    fi
    if (( $(left) > 45 )); then
      say "b. llama-cpp-python in process, $label"
      timeout "$(cap 40)" python3 "$SCRIPTS/bench.py" inproc "$model" --out "$WORK/$label/inproc.json" > /dev/null || note "$label: in-process measurement failed or timed out"
    fi
    report
  fi
}

# Let the model generator finish first (it is done long before the build is), so that it does
# not run beside the CPU measurements.
for i in $(seq 1 "$(cap 60 200)"); do kill -0 "$MM_PID" 2>/dev/null || break; sleep 1; done
if wait_model "$WORK/models/small.gguf"; then
  measure_model small "$WORK/models/small.gguf" "bench:1" 1
else note "the small model was not made (make_model.log)"; cat "$WORK/make_model.log"; fi

say "time left: $(left) s"
if [ "${KIT_SKIP_1B:-0}" != 1 ] && (( $(left) > 120 )); then
  if wait_model "$WORK/models/m1b.gguf"; then
    mkdir -p "$WORK/1b"
    measure_model 1b "$WORK/models/m1b.gguf" "bench1b:1" 0
  else note "the 1b model was not made in time"; fi
elif [ "${KIT_SKIP_1B:-0}" = 1 ]; then note "1b-shaped model skipped (KIT_SKIP_1B=1)"
else note "1b-shaped model skipped ($(left) s left, needs > 120)"; fi
cat "$WORK/make_model.log" >> "$WORK/notes.txt" 2>/dev/null
