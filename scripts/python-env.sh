#!/usr/bin/env bash
# Creates (once) the Python environment the client tests use: the official openai
# SDK, websockets, pytest and PyAV (FFmpeg's Opus codecs, a decoder that is not
# Parley's) at pinned versions. Prints the venv's python path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PARLEY_VENV:-$HOME/.cache/parley/venv}
req=$root/tests/python/requirements.txt
stamp=$venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating the Python test environment in $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  echo "$want" >"$stamp"
fi
echo "$venv/bin/python"
