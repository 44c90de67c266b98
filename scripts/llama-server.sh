#!/usr/bin/env bash
# Builds (once) llama.cpp's `llama-server`, the external OpenAI-compatible server the
# end-to-end tests use as an `[[llm.replicas]]` peer, and prints its path.
#
# The sources are the llama.cpp tree vendored in the `llama-cpp-python` source
# package (`vendor/llama.cpp`), fetched by exact version from the package index; cmake
# and ninja come from the system or, if missing, from the package index into a private
# build venv. The build is offline (web UI off, no HTTPS/curl), CPU only, static, niced,
# and takes 15-30 minutes on 2 cores; the binary is cached under
# ~/.cache/parley/llama-server/VERSION/bin/, so a second run prints the path at once.
# An interrupted build resumes where it stopped; its log is build.log next to bin/.
#
# PARLEY_LLAMA_SERVER=/path/to/llama-server skips the build and uses that binary.
set -euo pipefail

version=0.3.36 # llama-cpp-python, which pins its vendored llama.cpp
cache_root=${PARLEY_CACHE_DIR:-$HOME/.cache/parley}

main() {
  if [ -n "${PARLEY_LLAMA_SERVER:-}" ]; then
    if [ ! -x "$PARLEY_LLAMA_SERVER" ] || [ -d "$PARLEY_LLAMA_SERVER" ]; then
      echo "llama-server: PARLEY_LLAMA_SERVER=$PARLEY_LLAMA_SERVER is not an executable file" >&2
      exit 1
    fi
    echo "$PARLEY_LLAMA_SERVER"
    exit 0
  fi

  dest=$cache_root/llama-server/$version
  bin=$dest/bin/llama-server
  if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
  fi

  mkdir -p "$dest"
  # One build at a time: a second caller waits for the first, then finds the binary.
  exec 9>"$dest/.lock"
  flock 9
  if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
  fi
  build
  echo "$bin"
}

fail() {
  echo "llama-server: $1 (log: $log)" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
}

build() {
  work=$dest/build
  log=$dest/build.log
  mkdir -p "$work"
  : >"$log"
  echo "setup: building llama.cpp's llama-server from llama-cpp-python==$version (15-30 minutes, once; log: $log)" >&2
  local start
  start=$(date +%s)

  command -v c++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 ||
    fail "no C++ compiler; install build-essential (or clang)"

  # cmake (>= 3.14) and ninja: the system's if usable, else the package index's.
  local tools_venv=$cache_root/build-venv need=() cmake ninja
  cmake=$(command -v cmake || true)
  if [ -z "$cmake" ] || ! cmake_ok "$cmake"; then
    cmake=$tools_venv/bin/cmake
    [ -x "$cmake" ] || need+=(cmake)
  fi
  ninja=$(command -v ninja || true)
  if [ -z "$ninja" ]; then
    ninja=$tools_venv/bin/ninja
    [ -x "$ninja" ] || need+=(ninja)
  fi
  if ((${#need[@]})); then
    [ -x "$tools_venv/bin/python" ] || python3 -m venv "$tools_venv" >>"$log" 2>&1 ||
      fail "could not create the build venv $tools_venv"
    "$tools_venv/bin/python" -m pip install -q --disable-pip-version-check "${need[@]}" >>"$log" 2>&1 ||
      fail "could not install ${need[*]} from the package index"
  fi

  # The source package (llama.cpp is vendored in it), unpacked once.
  local src=$work/llama_cpp_python-$version/vendor/llama.cpp
  if [ ! -e "$work/.unpacked" ]; then
    rm -rf "$work" && mkdir -p "$work"
    python3 -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
      -d "$work" "llama-cpp-python==$version" >>"$log" 2>&1 ||
      fail "could not download llama-cpp-python==$version"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work" \
      "llama_cpp_python-$version/vendor/llama.cpp" >>"$log" 2>&1 ||
      fail "could not unpack llama-cpp-python==$version"
    rm -f "$work/llama_cpp_python-$version.tar.gz"
    touch "$work/.unpacked"
  fi

  "$cmake" -S "$src" -B "$work/out" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF \
    >>"$log" 2>&1 || fail "cmake configure failed"
  # Niced: the build is long and should not starve whatever else runs.
  nice -n 15 "$cmake" --build "$work/out" --target llama-server -j 2 >>"$log" 2>&1 ||
    fail "build failed"

  mkdir -p "$dest/bin"
  install -m 0755 "$work/out/bin/llama-server" "$bin.tmp"
  "$bin.tmp" --version >>"$log" 2>&1 || {
    rm -f "$bin.tmp"
    fail "the built llama-server does not run"
  }
  mv "$bin.tmp" "$bin"
  rm -rf "$work"
  echo "setup: built $bin in $(($(date +%s) - start)) s" >&2
}

cmake_ok() {
  local v
  v=$("$1" --version 2>/dev/null | head -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1) || return 1
  [ -n "$v" ] && [ "$(printf '%s\n' 3.14 "$v" | sort -V | head -n1)" = 3.14 ]
}

# Everything above is read before anything runs, so editing this file while a build
# is under way cannot derail it.
main "$@"
exit
