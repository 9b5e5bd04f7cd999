#!/usr/bin/env bash
# Install the system packages pear_mqtt's tests and `make up` need, when they are missing:
# Debian's mosquitto, mosquitto-clients and redis-server (the clustered broker's store), and,
# with PEAR_NEEDS, more package names.
# Installs with apt-get when run as root or with passwordless sudo; otherwise prints one line
# saying what to run and exits 1. Used by the Makefile (`make test`, `make up`) and .ci/run.
set -euo pipefail

want=(mosquitto mosquitto-clients redis-server ${PEAR_NEEDS:-})
missing=()
for pkg in "${want[@]}"; do
  case $pkg in
    mosquitto) command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=("$pkg") ;;
    mosquitto-clients) command -v mosquitto_pub >/dev/null 2>&1 || missing+=("$pkg") ;;
    redis-server) command -v redis-server >/dev/null 2>&1 || missing+=("$pkg") ;;
    *) dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
         || missing+=("$pkg") ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "pear_mqtt needs ${missing[*]}: install them with your system's package manager (no apt-get here)" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  run=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  run=(sudo -n)
else
  echo "pear_mqtt needs ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' (or 'make test-standalone', which needs no system package)" >&2
  exit 1
fi
echo "installing ${missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${run[@]}" apt-get update -qq
"${run[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian packages start a system broker on 1883 and a redis on 6379; pear_mqtt starts its
# own on free ports.
for svc in mosquitto redis-server; do
  if command -v systemctl >/dev/null 2>&1; then "${run[@]}" systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  if command -v service >/dev/null 2>&1; then "${run[@]}" service "$svc" stop >/dev/null 2>&1 || true; fi
done
exit 0
