#!/usr/bin/env bash
# Mooncake Store for bench.cluster's comparison (bench/mooncake.py), without touching the system
# or the project's venv: the non-CUDA wheel goes to .cache/mooncake/site (pip --target), and the
# shared libraries it needs that Debian 12 lacks (libibverbs1 and its libnl) are unpacked from
# their Debian packages into .cache/mooncake/deb (apt-get download + dpkg -x, no install).
# Usage: bash bench/mooncake_setup.sh   (then python -m bench.cluster measures Mooncake too)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=$PWD/.cache/mooncake
PY=${PY:-$PWD/.venv/bin/python}
VERSION=0.3.13.post1
mkdir -p "$DEST/site" "$DEST/debs" "$DEST/deb"
"$PY" -m pip install --quiet --target "$DEST/site" "mooncake-transfer-engine-non-cuda==$VERSION"
( cd "$DEST/debs" && apt-get download libibverbs1 libnl-3-200 libnl-route-3-200 )
for deb in "$DEST"/debs/*.deb; do dpkg -x "$deb" "$DEST/deb"; done
export LD_LIBRARY_PATH="$DEST/deb/usr/lib/x86_64-linux-gnu:$DEST/deb/lib/x86_64-linux-gnu"
missing=$(for f in "$DEST"/site/mooncake/*.so "$DEST"/site/mooncake/mooncake_master; do
            ldd "$f" | grep 'not found' || true; done | sort -u)
if [ -n "$missing" ]; then echo "still missing:"; echo "$missing"; exit 1; fi
PYTHONPATH="$DEST/site" "$PY" -c "import mooncake.store; print('mooncake.store imports')"
