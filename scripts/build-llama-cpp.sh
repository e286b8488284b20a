#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (CPU only, -march=native) from the
# llama.cpp vendored in the PyPI sdist of llama-cpp-python, as a performance
# and correctness reference for rbee. Needs only PyPI, gcc/g++ and python3.
# Idempotent: when the binaries are already there it just prints the bin dir.
#
#   scripts/build-llama-cpp.sh
#
# Output: ${RBEE_LLAMA_CPP_DIR:-$HOME/.cache/rbee/llama.cpp}/bin/
#   llama-bench, llama-tokenize, llama-completion (raw-prompt text generation,
#   the old llama-cli; today's llama-cli is a chat UI built with the server),
#   llama-simple, and llama-cpp-greedy (scripts/llama-cpp-greedy.cpp: a
#   greedy path as token ids and margins, which rbee's tests record)
#
# RBEE_LLAMA_CPP_CMAKE_ARGS: more cmake options for a new build directory,
# after the ones below (a later -D wins). On a VM whose CPU lists AMX but
# faults on it (llama-bench's prompt runs then die with SIGSEGV in
# ggml_backend_amx_mul_mat), build without -march=native's AMX, in a
# directory of its own:
#   RBEE_LLAMA_CPP_DIR=~/.cache/rbee/llama.cpp-noamx RBEE_LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=OFF \
#     -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \
#     -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" scripts/build-llama-cpp.sh
set -euo pipefail

version=0.3.36 # llama-cpp-python; vendors llama.cpp
dir="${RBEE_LLAMA_CPP_DIR:-$HOME/.cache/rbee/llama.cpp}"
bin="$dir/bin"
targets=(llama-bench llama-tokenize llama-completion llama-simple)
jobs="${RBEE_LLAMA_CPP_JOBS:-2}"

greedy_src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/llama-cpp-greedy.cpp"

have_all() {
  local t
  for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
  [ "$bin/llama-cpp-greedy" -nt "$greedy_src" ] || return 1
  [ "$(cat "$bin/.llama-cpp-python-version" 2>/dev/null)" = "$version" ]
}
if have_all; then
  echo "$bin"
  exit 0
fi

mkdir -p "$dir"
src="$dir/src/llama-cpp-python-$version/vendor/llama.cpp"
build="$dir/build-$version"

# --- source: the sdist from PyPI ---------------------------------------------
if [ ! -f "$src/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading the llama-cpp-python==$version sdist from PyPI (75 MB)..." >&2
  # --no-binary for this one package only: ":all:" would also apply to the
  # build dependencies pip installs to read the sdist's metadata, and so
  # compile cmake itself from source.
  python3 -m pip download --no-deps --disable-pip-version-check --quiet \
    --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$version"
  mkdir -p "$tmp/x"
  tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp/x"
  vend="$tmp/x/llama_cpp_python-$version/vendor/llama.cpp"
  if [ ! -f "$vend/CMakeLists.txt" ]; then
    echo "error: no vendor/llama.cpp in the llama-cpp-python==$version sdist" >&2
    exit 1
  fi
  rm -f "$vend/.git" # a dangling git-submodule link; build info becomes "unknown"
  rm -rf "$dir/src/llama-cpp-python-$version"
  mkdir -p "$(dirname "$src")"
  mv "$vend" "$src"
fi

# --- cmake (and ninja): the system's if new enough, else PyPI's in a venv -----
cmake_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 3 ] || { [ "$1" -eq 3 ] && [ "$2" -ge 21 ]; }
}
venv="$dir/venv"
cmake=""
if command -v cmake >/dev/null && cmake_ok cmake; then
  cmake=$(command -v cmake)
elif [ -x "$venv/bin/cmake" ] && cmake_ok "$venv/bin/cmake"; then
  cmake="$venv/bin/cmake"
else
  echo "installing cmake and ninja from PyPI into $venv..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet cmake ninja
  cmake="$venv/bin/cmake"
fi
generator=()
if [ -x "$venv/bin/ninja" ]; then
  generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja")
elif command -v ninja >/dev/null; then
  generator=(-G Ninja)
fi

# --- configure and build -------------------------------------------------------
if [ ! -f "$build/CMakeCache.txt" ]; then
  "$cmake" -S "$src" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_OPENMP=ON \
    -DGGML_CCACHE=OFF \
    -DGGML_BACKEND_DL=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=ON \
    ${RBEE_LLAMA_CPP_CMAKE_ARGS:-}
fi
start=$(date +%s)
"$cmake" --build "$build" --config Release -j "$jobs" --target "${targets[@]}"
echo "built in $(( $(date +%s) - start ))s" >&2

mkdir -p "$bin"
for t in "${targets[@]}"; do
  install -m 755 "$build/bin/$t" "$bin/$t"
done
# The greedy-path tool, against the static libraries those targets built.
g++ -O2 -std=c++17 "$greedy_src" -I "$src/include" -I "$src/ggml/include" \
  "$build/src/libllama.a" "$build/ggml/src/libggml.a" "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" \
  -fopenmp -lpthread -ldl -lm -o "$bin/llama-cpp-greedy"
echo "$version" >"$bin/.llama-cpp-python-version"
echo "$bin"
