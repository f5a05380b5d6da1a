#!/usr/bin/env bash
# Fills the image build context for deploy/container/Containerfile.
# Usage: build-context.sh STATIC_BINARY CONTEXT_DIR
set -euo pipefail
bin=$1
ctx=$2
here=$(cd "$(dirname "$0")" && pwd)
ca=/etc/ssl/certs/ca-certificates.crt
if [ ! -s "$ca" ]; then
    echo "build-context.sh: $ca is missing: apt-get install ca-certificates" >&2
    exit 1
fi
if command -v readelf >/dev/null && readelf -d "$bin" 2>/dev/null | grep -q NEEDED; then
    echo "build-context.sh: $bin is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'" >&2
    exit 1
fi
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/etc/poolrelay" "$ctx/spool"
chmod 0700 "$ctx/spool"
cp "$bin" "$ctx/poolrelay"
strip --strip-debug "$ctx/poolrelay" 2>/dev/null || true
chmod 0755 "$ctx/poolrelay"
install -m 0644 "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
install -m 0644 "$here/poolrelay.toml" "$ctx/rootfs/etc/poolrelay/poolrelay.toml"
printf 'root:x:0:0:root:/:/sbin/nologin\npoolrelay:x:65532:65532:poolrelay:/var/spool/poolrelay:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\npoolrelay:x:65532:\n' >"$ctx/rootfs/etc/group"
chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group"
