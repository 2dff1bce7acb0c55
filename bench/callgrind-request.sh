#!/usr/bin/env bash
# Instructions per request, end to end: the whole gateway process under callgrind (hyper, the
# stack, forwarding, the upstream connection), wrk -t1 -c8 for 10 s, against the same nginx
# `return 200` upstream as the other benchmarks. Deterministic, so two builds compare on a
# machine whose nanoseconds drift; prints the API-key route, the key + step-up token route,
# the refusal of a banned consumer (429, nothing forwarded), nginx doing the same key check
# with a `map` (one process, one worker: like for like) and the bare hyper proxy
# (examples/bare_proxy.rs) for reference, with each one's ratio to nginx.
#
#   bench/callgrind-request.sh          # needs valgrind (apt-get install valgrind)
#   BENCH_STORE=redis bench/callgrind-request.sh   # the gateway as a cluster node, on Redis
#
# Valgrind hides SHA-NI from the program, so the key's HMAC-SHA256 runs in software here
# (~10,000 instructions; a few hundred cycles natively): the report counts the SHA-256
# instructions apart, and the gateway's own work (total minus SHA-256 minus the bare proxy).
# Compare builds, not wall time.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION="${BENCH_DURATION:-10s}"
STORE="${BENCH_STORE:-sqlite}"
[[ "$STORE" == sqlite || "$STORE" == redis ]] || die "BENCH_STORE must be sqlite or redis (got '$STORE')"
DURATION_S="$(duration_seconds "$DURATION")" || die "BENCH_DURATION must look like 10s"
command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install valgrind)"

ensure_tools
bench_setup_work stepgate-callgrind-request
build_gateway
run_waited bash -c 'cd "$1" && exec cargo build --release --example bare_proxy' bench-build "$ROOT" \
    || die "building the bare proxy failed"
BARE_BIN="$ROOT/target/release/examples/bare_proxy"
start_upstream

[[ "$STORE" == redis ]] && start_redis
GW="$WORK/gateway"
mkdir -p "$GW/policies" "$GW/data"
printf 'api_key: required\nsecond_factor: off\n' >"$GW/policies/key.yaml"
printf 'api_key: required\nsecond_factor: required\nstep_up: { ttl: 1h, scope: policy }\n' \
    >"$GW/policies/two-factor.yaml"
GATEWAY_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
{ gateway_yaml_head "$GW"; [[ "$STORE" == sqlite ]] || redis_store_yaml; cat <<EOF; } >"$GW/gateway.yaml"
upstreams:
  nginx: { url: "http://127.0.0.1:$UPSTREAM_PORT" }
routes:
  - { name: key, match: { path: /key }, upstream: nginx, policy: key }
  - { name: two-factor, match: { path: /two-factor }, upstream: nginx, policy: two-factor }
EOF

# callgrind_run NAME PID PORT PATH HEADER...: zeroes the counters of PID (the process last
# started), runs wrk, dumps, and appends "NAME instructions/request requests non-2xx" to
# $WORK/counts.
callgrind_run() {
    local name="$1" pid="$2" port="$3" path="$4" out="$WORK/wrk-$1.txt"
    shift 4
    local headers=() h
    for h in "$@"; do headers+=(-H "$h"); done
    callgrind_control -z "$pid" >/dev/null 2>&1
    run_wrk_fg "$out" "$DURATION_S" -t1 -c8 -d"$DURATION" "${headers[@]}" "http://127.0.0.1:$port$path"
    local before i
    before="$(find "$WORK" -maxdepth 1 -name "${STARTED_OUT##*/}.*" | wc -l)"
    callgrind_control -d "$pid" >/dev/null 2>&1
    # valgrind writes the dump when it next runs the process's threads: wait for the file.
    for ((i = 0; i < 300; i++)); do
        (($(find "$WORK" -maxdepth 1 -name "${STARTED_OUT##*/}.*" | wc -l) > before)) && break
        sleep 0.1
    done
    sleep 0.5
    python3 - "$name" "$out" "$STARTED_OUT" >>"$WORK/counts" <<'PY'
import glob, re, sys
name, wrk, prefix = sys.argv[1:]
text = open(wrk).read()
requests = int(re.search(r"(\d+) requests in", text).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
# The dump after the zeroing is the highest-numbered file (callgrind appends .1, .2, ...).
dumps = sorted(glob.glob(prefix + ".*"), key=lambda f: int(f.rsplit(".", 1)[1]))
if not dumps:
    sys.exit(f"{name}: callgrind wrote no dump (is the process running under valgrind?)")
dump = open(dumps[-1], errors="replace").read()
total = int(re.search(r"^summary: (\d+)", dump, re.M).group(1))
# The SHA-256 compressions' own cost (they call nothing): a function's cost lines follow its
# `fn=` line; the line after a `calls=` line is a callee's cost, not the function's own.
names, own, hashing, skip = {}, False, 0, False
for line in dump.splitlines():
    if line.startswith("fn="):
        m = re.match(r"fn=\((\d+)\)(?: (.*))?", line)
        if m and m.group(2):
            names[m.group(1)] = m.group(2)
        fn = names.get(m.group(1), "") if m else line[3:]
        own = fn.startswith("sha2::")
    elif line.startswith("cfn="):
        m = re.match(r"cfn=\((\d+)\) (.*)", line)
        if m:
            names[m.group(1)] = m.group(2)
    elif line.startswith("calls="):
        skip = True
    elif line[:1].isdigit() or line[:1] in "+-*":
        if skip:
            skip = False
        elif own:
            parts = line.split()
            if len(parts) > 1 and parts[1].isdigit():
                hashing += int(parts[1])
print(f"{name}\t{total // requests}\t{requests}\t{non2xx.group(1) if non2xx else 0}"
      f"\t{hashing // requests}")
PY
}

# start_under_callgrind NAME PORT PATH STATUS CMD...: sets STARTED_PID (and STARTED_OUT, its
# callgrind file) once GET PATH answers STATUS; valgrind needs a while.
start_under_callgrind() {
    local name="$1" port="$2" path="$3" want="$4" i
    shift 4
    STARTED_OUT="$WORK/cg-$name.out"
    valgrind --tool=callgrind --callgrind-out-file="$STARTED_OUT" "$@" \
        >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    for ((i = 0; i < 600; i++)); do
        kill -0 "$STARTED_PID" 2>/dev/null || { sed 's/^/    /' "$WORK/$name.log" >&2; die "$name exited"; }
        [[ "$(http_status "$port" "$path")" == "$want" ]] && return 0
        sleep 0.1
    done
    die "$name did not answer under valgrind within 60 s"
}

: >"$WORK/counts"
log "stepgate under callgrind (start-up takes a few seconds)"
# Not through `env`: valgrind does not follow an exec.
export RUST_LOG=warn
start_under_callgrind stepgate "$GATEWAY_PORT" /key 401 "$GATEWAY_BIN" run -c "$GW/gateway.yaml"
GATEWAY_PID="$STARTED_PID"
# One consumer with TOTP, and a step-up token earned with a code.
KEY="$(cli consumer add bench | json '["api_key"]')" || die "could not create a consumer"
SECRET="$(cli totp enroll bench | json '["secret"]')" || die "could not enrol TOTP"
cli totp confirm bench "$(totp "$SECRET" 1)" >/dev/null || die "could not confirm TOTP"
TOKEN="$(python3 - "$GATEWAY_PORT" "$KEY" "$(totp "$SECRET")" <<'PY'
import json, sys, urllib.request
port, key, code = sys.argv[1:]
req = urllib.request.Request(f"http://127.0.0.1:{port}/_stepgate/step-up", method="POST",
                             headers={"X-Api-Key": key, "X-OTP": code})
print(json.load(urllib.request.urlopen(req, timeout=30))["token"])
PY
)" || die "could not earn a step-up token"
for path in /key /two-factor; do   # warm the pool and the caches
    for _ in 1 2 3 4 5; do
        http_status "$GATEWAY_PORT" "$path" "X-Api-Key: $KEY" "X-Step-Up-Token: $TOKEN" >/dev/null
    done
done
log "API-key route, $DURATION"
callgrind_run key "$GATEWAY_PID" "$GATEWAY_PORT" /key "X-Api-Key: $KEY"
log "key + step-up token route, $DURATION"
callgrind_run key-and-token "$GATEWAY_PID" "$GATEWAY_PORT" /two-factor \
    "X-Api-Key: $KEY" "X-Step-Up-Token: $TOKEN"
log "refused: the same consumer banned (wrong codes), $DURATION"
ban_consumer "$GATEWAY_PORT" /two-factor "$KEY" || die "could not ban the consumer"
callgrind_run refused-banned "$GATEWAY_PID" "$GATEWAY_PORT" /two-factor \
    "X-Api-Key: $KEY"
stop_pid "$GATEWAY_PID"

# nginx doing the same key check (a `map` of the one key), one process (master_process off,
# one worker) under callgrind like the gateway: the like-for-like reference.
KEYMAP_DIR="$WORK/keymap"
mkdir -p "$KEYMAP_DIR/tmp" "$KEYMAP_DIR/logs"
printf '        "%s" 1;\n' "$KEY" >"$KEYMAP_DIR/keys.map"
KEYMAP_PORT="$(free_port)"
nginx_keymap_conf "$KEYMAP_DIR" "$KEYMAP_PORT" >"$KEYMAP_DIR/nginx.conf"
log "nginx key map under callgrind"
start_under_callgrind nginx-keymap "$KEYMAP_PORT" /key 401 \
    "$NGINX_BIN" -p "$KEYMAP_DIR" -c "$KEYMAP_DIR/nginx.conf" -e "$KEYMAP_DIR/logs/error.log"
for _ in 1 2 3 4 5; do http_status "$KEYMAP_PORT" /key "X-Api-Key: $KEY" >/dev/null; done
callgrind_run nginx-keymap "$STARTED_PID" "$KEYMAP_PORT" /key "X-Api-Key: $KEY"
stop_pid "$STARTED_PID"

BARE_PORT="$(free_port)"
log "bare hyper proxy under callgrind"
start_under_callgrind bare "$BARE_PORT" /key 200 "$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UPSTREAM_PORT" 2
for _ in 1 2 3 4 5; do http_status "$BARE_PORT" /key >/dev/null; done
callgrind_run bare "$STARTED_PID" "$BARE_PORT" /key "X-Api-Key: $KEY"

mkdir -p "$RESULTS_DIR"
REPORT="$RESULTS_DIR/$(date -u +%Y%m%dT%H%M%SZ)-callgrind-request-$STORE.md"
{
    echo "# Instructions per request (callgrind, whole process)"
    echo
    echo "- commit: $(commit_desc)"
    echo "- store: $STORE"
    echo "- wrk -t1 -c8 -d$DURATION; nginx \`return 200\` upstream; SHA-256 in software under valgrind"
    echo
    nginx="$(awk -F'\t' '$1 == "nginx-keymap" { print $2 }' "$WORK/counts")"
    bare="$(awk -F'\t' '$1 == "bare" { print $2 }' "$WORK/counts")"
    echo "| target | instructions / request | × nginx key map | SHA-256 | own work | requests | non-2xx |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    while IFS=$'\t' read -r name per requests non hashing; do
        ratio="$(awk -v a="$per" -v b="$nginx" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
        own=-
        [[ "$name" == key* ]] && own=$((per - hashing - bare))
        echo "| $name | $per | $ratio | $hashing | $own | $requests | $non |"
    done <"$WORK/counts"
    echo
    echo "own work (forwarded requests): instructions / request minus SHA-256 minus the bare hyper proxy's."
} >"$REPORT"
cat "$REPORT"
log "report written to ${REPORT#"$ROOT"/}"
