#!/usr/bin/env bash
# CI container stage: the integration suite against brokers in containers, and the Compose
# topology through `pear-mqtt up --backend docker`. Exits non-zero on any failure.
#
#   1. install   docker.io, debootstrap, docker-compose, mosquitto(-clients) if missing
#   2. engine    dockerd --bridge=none --iptables=false in the background (log:
#                /var/log/pear-ci-dockerd.log), unless an engine already answers; the trap
#                stops the one this script started, and only that one
#   3. images    deploy/images/build.sh: debootstrap + docker import + docker build, offline
#                (cached in /var/cache/pear-images: a second run takes seconds)
#   4. tests     PEAR_TEST_BACKEND=container pytest: every integration test that starts a
#                broker through the fixtures (marker uses_broker), every broker in the broker
#                image, plus tests/container; see PEAR_CONTAINER_TESTS below
#   5. compose   PEAR_BACKEND=docker pear-mqtt up start / status / logs / stop
#
# Containers use the host's network only and listen on 127.0.0.1 only; nothing is pulled from
# any registry. Idempotent: run it again on the same machine and it reuses what is there.
# See deploy/CONTAINERS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export DEBIAN_FRONTEND=noninteractive
# Ryuk (testcontainers' reaper) is an image from a registry: not to be had here.
export TESTCONTAINERS_RYUK_DISABLED=true
DOCKERD_LOG=${PEAR_DOCKERD_LOG:-/var/log/pear-ci-dockerd.log}
SMOKE_DIR=
DOCKERD_PID=
began=$SECONDS
stage_began=$SECONDS
timings=()

say() { printf '[containers %(%H:%M:%S)T] %s\n' -1 "$*"; }
stage() {  # stage NAME: close the previous stage's timer, open the next
  if [ -n "${stage_name:-}" ]; then timings+=("$(printf '%-8s %4ss' "$stage_name" \
    $((SECONDS - stage_began)))"); fi
  stage_name=$1
  stage_began=$SECONDS
  [ "$1" = end ] || say "== $1"
}

cleanup() {
  local status=$?
  set +e
  if [ -n "$SMOKE_DIR" ] && [ -f "$SMOKE_DIR/up.json" ]; then
    "$ROOT/.venv/bin/pear-mqtt" up stop --dir "$SMOKE_DIR" --grace 3 >/dev/null 2>&1
  fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    say "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
  fi
  if [ "$status" -ne 0 ] && [ -n "$DOCKERD_PID" ] && [ -f "$DOCKERD_LOG" ]; then
    echo "--- last lines of $DOCKERD_LOG ---" >&2
    tail -n 20 "$DOCKERD_LOG" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 1. packages --------------------------------------------------------------------------
stage install
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian packages may start a system broker or engine where systemd runs; the tests start
# their own brokers on free ports, and this script its own engine.
if command -v systemctl >/dev/null 2>&1; then systemctl stop mosquitto >/dev/null 2>&1 || true; fi
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ]; then
  say "make venv (log: /tmp/pear-ci-venv.log)"
  make venv >/tmp/pear-ci-venv.log 2>&1 || { tail -n 30 /tmp/pear-ci-venv.log >&2; exit 1; }
fi

# -- 2. engine ----------------------------------------------------------------------------
stage engine
if docker info >/dev/null 2>&1; then
  say "a Docker engine already answers; using it (and leaving it running)"
else
  # --bridge=none/--iptables=false: no docker0, no NAT, no firewall rules; --ip-forward=false
  # leaves the host's forwarding setting alone. Containers get the host's network only.
  say "starting dockerd --bridge=none --iptables=false (log: $DOCKERD_LOG)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  dockerd --bridge=none --iptables=false --ip-forward=false --data-root /var/lib/docker \
    >>"$DOCKERD_LOG" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { echo "dockerd exited" >&2; exit 1; }
    sleep 0.5  # poll for the engine's socket
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not answer within 60 s" >&2; exit 1; }
fi
say "engine $(docker version --format '{{.Server.Version}}'), compose: $(
  (docker compose version --short 2>/dev/null || docker-compose version --short) | head -n 1)"

# -- 3. images ----------------------------------------------------------------------------
stage images
bash deploy/images/build.sh

# -- 4. integration suite in containers ---------------------------------------------------
stage tests
# The broker-facing integration tests (the others run no broker: embedded amqtt, `up` with
# local processes; .ci/run covers them) and tests/container, the bridge's included.
# PEAR_CONTAINER_TESTS replaces the selection, e.g.
#   PEAR_CONTAINER_TESTS="tests/integration/test_network.py" bash .ci/containers.sh
read -r -a selection <<<"${PEAR_CONTAINER_TESTS:-tests/integration tests/container}"
PEAR_TEST_BACKEND=container .venv/bin/python -m pytest "${selection[@]}" \
  -m "(uses_broker or container) and not faults" -p no:cacheprovider -q -rfEs --durations=5 \
  --junitxml=/tmp/pear-container-tests.xml

# -- 5. Compose smoke test through pear-mqtt up -------------------------------------------
stage compose
SMOKE_DIR=$(mktemp -d /tmp/pear-compose-smoke.XXXXXX)
export PEAR_BACKEND=docker
.venv/bin/pear-mqtt up start --dir "$SMOKE_DIR" --ports 0,0,0 --timeout 120
.venv/bin/pear-mqtt up status --dir "$SMOKE_DIR"
.venv/bin/pear-mqtt up logs --dir "$SMOKE_DIR" -n 2 >/dev/null
.venv/bin/pear-mqtt up stop --dir "$SMOKE_DIR"
project=$(cat "$SMOKE_DIR/compose.project")
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project")
[ -z "$left" ] || { echo "containers left after up stop: $left" >&2; exit 1; }
if .venv/bin/pear-mqtt up status --dir "$SMOKE_DIR" >/dev/null; then
  echo "status reports healthy after stop" >&2; exit 1
fi
rm -rf "$SMOKE_DIR"
SMOKE_DIR=
unset PEAR_BACKEND

stage end
say "container stage passed in $((SECONDS - began)) s:"
printf '  %s\n' "${timings[@]}"
