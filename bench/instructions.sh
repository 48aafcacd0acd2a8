#!/usr/bin/env bash
# User-space instructions sticky-proxy executes per request, counted by callgrind. Unlike CPU
# time on a shared machine, this figure repeats from run to run (within about 1 %), so it is the
# one to compare two builds or two commits with. The kernel's share is not in it.
#
#   bash bench/instructions.sh                        # this tree, returning visitors, metrics on
#   bash bench/instructions.sh --access-log text      # extra flags for `sticky-proxy run`
#   PYTHONPATH=/tmp/before PROXY=".venv/bin/python -P -m proxy" bash bench/instructions.sh
#                                                     # another tree (git worktree add /tmp/before REV)
#
# Needs valgrind, nginx and wrk (apt). Backends: the benchmark's nginx on 127.0.0.1:9001-9003;
# the proxy listens on 127.0.0.1:8099. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PROXY=${PROXY:-.venv/bin/python -m proxy}
DURATION=${DURATION:-10}
COOKIE='ISTIOID="d5bede35465dd05f"'
run=${RUN_DIR:-$(mktemp -d /tmp/sticky-instructions-XXXXXX)}
chmod 755 "$run"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true  # the ports are free again when this script returns
}
trap cleanup EXIT
if curl -s -o /dev/null http://127.0.0.1:8099/; then
    echo "127.0.0.1:8099 is in use: stop what listens there first" >&2
    exit 1
fi

sed -e "s|@@RUN@@|$run|g; s|@@SINK@@|127.0.0.1:9004|g; s|@@NOFILE@@|4096|g; s|@@CONNS@@|2048|g" \
    bench/configs/backend-nginx.conf > "$run/backend.conf"
nginx -c "$run/backend.conf" -e "$run/backend.err" & pids+=($!)

# shellcheck disable=SC2086  # PROXY is a command line
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$run/callgrind.out" \
    $PROXY run --upstream 127.0.0.1:9001 --upstream 127.0.0.1:9002 --upstream 127.0.0.1:9003 \
    --cookie ISTIOID --ttl 60s --listen 127.0.0.1:8099 --log-level warning \
    --metrics-port 0 --ops-address 127.0.0.1 --access-log off --admin-port off \
    --readiness-port off --drain-time 0 "$@" > /dev/null 2> "$run/valgrind.log" & pid=$!
pids+=("$pid")
for _ in $(seq 200); do
    curl -s -o /dev/null http://127.0.0.1:8099/ && break
    sleep 0.3
done
wrk -t1 -c50 -d3s -H "Cookie: $COOKIE" http://127.0.0.1:8099/ > /dev/null   # warm up, uncounted
callgrind_control -i on "$pid" > /dev/null
wrk -t1 -c50 -d"${DURATION}s" -H "Cookie: $COOKIE" http://127.0.0.1:8099/ > "$run/wrk.txt"
callgrind_control -i off "$pid" > /dev/null
callgrind_control -d "$pid" > /dev/null
python3 - "$run" <<'PY'
import pathlib, re, sys
run = pathlib.Path(sys.argv[1])
requests = int(re.search(r"(\d+) requests in", (run / "wrk.txt").read_text()).group(1))
dump = next(run.glob("callgrind.out.*"))
lines = dump.read_text().splitlines()
total = next(int(line.split()[1]) for line in lines if line.startswith("totals:"))
print(f"{requests} requests, {total:,} instructions: {total // requests:,} per request")
PY
