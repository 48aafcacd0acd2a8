#!/usr/bin/env bash
# Installs what bench/run.py and bench/instructions.sh need besides Python: nginx, haproxy, wrk,
# valgrind, curl (and taskset, from util-linux). Idempotent: does nothing when they are all there.
# Debian/Ubuntu, run as root. The benchmark never uses the system services these packages may
# start; it runs its own processes on 127.0.0.1 (ports 8081-8099 and 9001-9004).
set -euo pipefail
missing=()
for tool in nginx haproxy wrk valgrind curl taskset; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "bench/setup.sh: nginx haproxy wrk valgrind curl taskset already installed"
    exit 0
fi
echo "bench/setup.sh: installing ${missing[*]}"
packages=()
for tool in "${missing[@]}"; do
    case "$tool" in
        taskset) packages+=(util-linux) ;;
        *) packages+=("$tool") ;;
    esac
done
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${packages[@]}"
