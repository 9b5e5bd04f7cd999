#!/usr/bin/env bash
# Build pear_mqtt's container images without any container registry.
#
#   pear/debian:bookworm    Debian bookworm (debootstrap minbase + mosquitto, python3, tini),
#                           imported with `docker import`: the only base image there is
#   pear/mosquitto:latest   the broker (broker/image/Dockerfile), FROM pear/debian:bookworm
#   pear/pear-mqtt:latest   agent, bridge and CLI (deploy/images/Dockerfile), FROM the same
#
# Usage: deploy/images/build.sh            (root: debootstrap needs it; a Docker engine)
#
# Offline: packages come from the Debian mirror through debootstrap on the host, Python wheels
# from PyPI through pip on the host; `docker build` runs with --network none and pulls
# nothing. Both images share the one imported base layer, so it is stored once.
#
# Cache (PEAR_IMAGE_CACHE, default /var/cache/pear-images):
#   rootfs-bookworm-<key>.tar  the debootstrapped root file system, keyed by suite, variant
#                              and package list; reused until one of those changes
#   debs/                      debootstrap's package cache
#   wheels/                    the dependency wheels (pip wheel reads them with --no-index
#                              first, and asks PyPI only when something is missing)
# A second run imports nothing and rebuilds only the layers whose inputs changed.
# `rm -rf /var/cache/pear-images` forces a fresh debootstrap.
#
# Environment: PEAR_IMAGE_CACHE, PEAR_DEBIAN_MIRROR (default http://deb.debian.org/debian),
# PEAR_BASE_IMAGE, PEAR_BROKER_IMAGE, PEAR_APP_IMAGE (image names), PY (a Python 3.11 with
# pip; default .venv/bin/python, else python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${PEAR_IMAGE_CACHE:-/var/cache/pear-images}
SUITE=bookworm
VARIANT=minbase
MIRROR=${PEAR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# mosquitto-clients and python3 serve the health checks; tini is PID 1 of the Python images;
# python3-venv gives the app image its own pip-free-at-runtime virtual environment.
PACKAGES=mosquitto,mosquitto-clients,python3,python3-venv,tini
BASE_IMAGE=${PEAR_BASE_IMAGE:-pear/debian:bookworm}
BROKER_IMAGE=${PEAR_BROKER_IMAGE:-pear/mosquitto:latest}
APP_IMAGE=${PEAR_APP_IMAGE:-pear/pear-mqtt:latest}
if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
# The legacy builder works with every docker CLI and engine pairing found here (a newer CLI
# without the buildx plugin refuses BuildKit builds); it needs no network for COPY-only builds.
export DOCKER_BUILDKIT=0

say() { printf '[images %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf 'deploy/images/build.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and the image cache need it)"
command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (see deploy/CONTAINERS.md)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  die "$PY is not Python 3.11: the wheels must match the image's python3 (3.11)"

mkdir -p "$CACHE/debs" "$CACHE/wheels"

# -- 1. base image: debootstrap -> tar -> docker import ------------------------------------
key=$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" "cleanup-v1" | sha256sum | cut -c1-16)
tarball=$CACHE/rootfs-$SUITE-$key.tar
have=$(docker image inspect -f '{{index .Config.Labels "org.pear.rootfs"}}' "$BASE_IMAGE" \
         2>/dev/null || true)
if [ "$have" = "$key" ]; then
  say "base: $BASE_IMAGE is current (rootfs $key)"
else
  if [ -s "$tarball" ]; then
    say "base: cached rootfs $tarball"
  else
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    say "base: debootstrap $SUITE ($VARIANT + $PACKAGES) from $MIRROR"
    work=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant="$VARIANT" --include="$PACKAGES" --cache-dir="$CACHE/debs" \
      "$SUITE" "$work/root" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 ||
      { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # Nothing in the images installs packages, and the build must be reproducible from the
    # tarball alone: drop what only apt and a running system need.
    rm -rf "$work/root/var/cache/apt/"*.bin "$work/root/var/cache/apt/archives/"*.deb \
      "$work/root/var/lib/apt/lists/"* "$work/root/var/log/"* "$work/root/tmp/"* \
      "$work/root/usr/share/man/"* "$work/root/usr/share/locale/"*
    tar --numeric-owner -C "$work/root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$work"
    trap - EXIT
    # Older rootfs tarballs (another package list) only take space.
    find "$CACHE" -maxdepth 1 -name "rootfs-$SUITE-*.tar" ! -name "rootfs-$SUITE-$key.tar" \
      -delete
  fi
  say "base: docker import -> $BASE_IMAGE"
  docker import \
    --change "LABEL org.pear.rootfs=$key" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --message "debootstrap --variant=$VARIANT --include=$PACKAGES $SUITE" \
    "$tarball" "$BASE_IMAGE" >/dev/null
fi

# -- 2. broker image -------------------------------------------------------------------------
say "broker: docker build -> $BROKER_IMAGE"
build() {  # docker build, its output shown only when it fails
  docker build --network none --build-arg "BASE=$BASE_IMAGE" "$@" >"$CACHE/build.log" 2>&1 ||
    { tail -n 40 "$CACHE/build.log" >&2; die "docker build $* failed (log above)"; }
}
build -t "$BROKER_IMAGE" "$ROOT/broker/image"

# -- 3. pear_mqtt image: wheels built on the host, installed with --no-index in the build ----
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/wheels"
say "app: wheels for pear_mqtt and its dependencies"
pipq=("$PY" -m pip --disable-pip-version-check -q)
# Fixed timestamps make the pear_mqtt wheel byte-identical while the source is, so Docker's
# layer cache holds across runs.
export SOURCE_DATE_EPOCH=315532800
if ! "${pipq[@]}" wheel --no-index --find-links "$CACHE/wheels" -w "$ctx/wheels" "$ROOT" \
      >"$ctx/pip.log" 2>&1; then
  # Something is not cached yet (first run, or a new dependency): ask PyPI once and keep it.
  "${pipq[@]}" download -d "$CACHE/wheels" "setuptools>=77" wheel >>"$ctx/pip.log" 2>&1 ||
    { cat "$ctx/pip.log" >&2; die "pip download failed"; }
  "${pipq[@]}" wheel --find-links "$CACHE/wheels" -w "$ctx/wheels" "$ROOT" >>"$ctx/pip.log" \
    2>&1 || { cat "$ctx/pip.log" >&2; die "pip wheel failed"; }
fi
find "$ctx/wheels" -name '*.whl' ! -name 'pear_mqtt-*' -exec cp -n {} "$CACHE/wheels/" \;
# Dependencies and pear_mqtt go in separate layers: a change to pear_mqtt alone reinstalls
# one small wheel, and an unchanged tree (reproducible wheel, see above) rebuilds nothing.
mkdir "$ctx/app"
mv "$ctx"/wheels/pear_mqtt-*.whl "$ctx/app/"
cp "$ROOT/deploy/images/Dockerfile" "$ROOT/deploy/images/pear-agent-health" "$ctx/"
say "app: docker build -> $APP_IMAGE"
build -t "$APP_IMAGE" "$ctx"
say "done: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^(${BASE_IMAGE%%:*}|${BROKER_IMAGE%%:*}|${APP_IMAGE%%:*}):" | sort | tr '\n' ' ')"
