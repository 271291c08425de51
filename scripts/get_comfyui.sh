#!/usr/bin/env bash
# Usage: bash scripts/get_comfyui.sh TAG DEST
# Put ComfyUI release TAG (v0.19.3, v0.3.64) at DEST for the node tests, unless DEST already holds a
# checkout (which is used as it is): copied from ../shared/comfyui/TAG beside this repository where
# that exists (CI, machines that cannot reach GitHub), else `git clone --depth 1 --branch TAG` from
# GitHub.  One line says which.  Where neither works (offline) one line says so: the tests that need
# that checkout then skip, and under CI=true this script fails instead.
set -euo pipefail
tag=$1
dest=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$dest/main.py" ] && exit 0
cannot() {
  if [ "${CI:-}" = "true" ]; then
    echo "error: ComfyUI $tag for the tests: $1 (CI=true: the node tests may not be skipped)" >&2
    exit 1
  fi
  echo "ComfyUI $tag for the tests: $1; the tests that need it are skipped"
  exit 0
}
[ -e "$dest" ] && cannot "$dest exists but is no ComfyUI checkout (no main.py)"
shared="$(cd "$repo/.." && pwd)/shared/comfyui/$tag"
partial="$dest.partial"
rm -rf "$partial"
mkdir -p "$(dirname "$dest")"
if [ -f "$shared/main.py" ]; then
  # The shared trees are read-only, and ComfyUI writes into its own tree (user/, output/, database).
  cp -R "$shared" "$partial"
  chmod -R u+w "$partial"
  how="copied from $(cd "$shared" && pwd)"
elif GIT_TERMINAL_PROMPT=0 git -c http.lowSpeedLimit=1000 -c http.lowSpeedTime=60 clone -q --depth 1 \
    --branch "$tag" https://github.com/comfyanonymous/ComfyUI "$partial" >/dev/null 2>&1; then
  how="cloned from https://github.com/comfyanonymous/ComfyUI"
else
  rm -rf "$partial"
  cannot "no checkout at $dest, no $shared, and git clone from GitHub failed (offline?)"
fi
mv "$partial" "$dest"
echo "ComfyUI $tag for the tests: $how to $dest"
