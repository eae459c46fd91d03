#!/usr/bin/env bash
# Base images for a host that cannot pull from Docker Hub, made from Debian's own packages
# (Debian bookworm, the release python:3.11-slim and redis:7 are built on):
#
#   regcl-local/debian:bookworm   debootstrap --variant=minbase bookworm, + ca-certificates
#   regcl-local/python:3.11       the same + Debian's python3 (3.11) and python3-venv, the
#                                 stand-in for python:3.11-slim (BASE of docker/Dockerfile)
#   regcl-local/redis:7           docker/redis.Dockerfile on the first: Debian's redis-server 7
#
#   docker/make_local_bases.sh [--force]     # as root (debootstrap, chroot); dockerd running
#
# MIRROR (default http://deb.debian.org/debian) is the Debian mirror; WORK (default
# /var/tmp/regcl-bases) holds the root filesystem while it is made. Images that exist already
# are kept unless --force. scripts/docker_check.sh --local-bases calls this.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${WORK:-/var/tmp/regcl-bases}
DEBIAN_IMAGE=regcl-local/debian:bookworm
PYTHON_IMAGE=regcl-local/python:3.11
REDIS_IMAGE=regcl-local/redis:7
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
force=0
[[ ${1:-} == --force ]] && force=1

log() { printf '[make_local_bases] %s\n' "$*" >&2; }
have() { [[ $force == 0 ]] && docker image inspect "$1" >/dev/null 2>&1; }

# Keep only what an image needs: no apt lists or package cache (Dockerfiles run apt-get update
# first, as on the official images), no docs, man pages or translations.
slim() {
    local root=$1
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*.log \
        "$root"/tmp/* "$root"/root/.cache
}

import_rootfs() {
    local root=$1 tag=$2 cmd=$3
    log "importing $root as $tag"
    tar --numeric-owner -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "CMD [\"$cmd\"]" - "$tag" >/dev/null
}

if have "$DEBIAN_IMAGE" && have "$PYTHON_IMAGE" && have "$REDIS_IMAGE"; then
    log "all three exist (--force makes them again)"
    exit 0
fi
command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 2; }

rm -rf "$WORK" && mkdir -p "$WORK"
log "debootstrap bookworm from $MIRROR into $WORK/debian (a few minutes)"
debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/debian" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
mirror_root=${MIRROR%/debian}
cat >"$WORK/debian/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $mirror_root/debian-security bookworm-security main
EOF

cp -a "$WORK/debian" "$WORK/python"
log "apt-get install python3 python3-venv (chroot)"
chroot "$WORK/python" /bin/sh -ec 'export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --no-install-recommends python3 python3-venv
    python3 -c "import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version"' \
    >"$WORK/python.log" 2>&1 || { tail -20 "$WORK/python.log" >&2; exit 1; }

slim "$WORK/debian"
slim "$WORK/python"
import_rootfs "$WORK/debian" "$DEBIAN_IMAGE" bash
import_rootfs "$WORK/python" "$PYTHON_IMAGE" python3
rm -rf "$WORK"

log "building $REDIS_IMAGE from docker/redis.Dockerfile"
docker build -q --build-arg "BASE=$DEBIAN_IMAGE" -t "$REDIS_IMAGE" - \
    <"$REPO/docker/redis.Dockerfile" >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' regcl-local/* >&2
