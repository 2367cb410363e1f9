#!/usr/bin/env bash
# Build llama.cpp's llama-server from the very llama.cpp that the installed llama-cpp-python
# vendors (its sdist from PyPI), cached under .bench-cache/ and never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=$($PY -c "import llama_cpp; print(llama_cpp.__version__)")
CACHE=.bench-cache
SERVER=$CACHE/llama-server-$VERSION
if [[ -x $SERVER ]]; then echo "$SERVER"; exit 0; fi
mkdir -p $CACHE
if [[ ! -f $CACHE/llama_cpp_python-$VERSION.tar.gz ]]; then
  $PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d $CACHE >&2
fi
SRC=$CACHE/src-$VERSION
if [[ ! -d $SRC ]]; then
  mkdir -p $SRC
  tar -xzf $CACHE/llama_cpp_python-$VERSION.tar.gz -C $SRC --strip-components=1
fi
cmake -S $SRC/vendor/llama.cpp -B $SRC/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >&2
cmake --build $SRC/build --target llama-server -j "$(nproc)" >&2
cp "$(find $SRC/build -name llama-server -type f -perm -u+x | head -1)" $SERVER
echo "$SERVER"
