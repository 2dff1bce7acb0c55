#!/usr/bin/env bash
# Load test: wrk against nginx directly vs. through stepgate, same settings,
# alternating rounds. See bench/README.md.
#
#   bench/run.sh
#   BENCH_CONNS="64 256" BENCH_ROUNDS=5 BENCH_DURATION=20s bench/run.sh
#
# Everything runs on 127.0.0.1 with ports chosen at run time. Every process
# started here is stopped on exit (normal, error or Ctrl-C).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$ROOT/bench"
RESULTS_DIR="$BENCH_DIR/results"

THREADS="${BENCH_THREADS:-1}"
CONNS_LIST="${BENCH_CONNS:-64}"
DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-3}"
WARMUP="${BENCH_WARMUP:-2s}"   # per target and connection count, not reported; 0 disables

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# wrk durations: 10, 10s, 2m, 1h -> whole seconds (used for the watchdog).
duration_seconds() {
    local d="$1"
    [[ "$d" =~ ^([0-9]+)([smh]?)$ ]] || return 1
    local n="${BASH_REMATCH[1]}"
    case "${BASH_REMATCH[2]}" in
        m) echo $((n * 60)) ;;
        h) echo $((n * 3600)) ;;
        *) echo "$n" ;;
    esac
}

is_uint "$THREADS" && ((THREADS >= 1)) || die "BENCH_THREADS must be a positive integer (got '$THREADS')"
is_uint "$ROUNDS" && ((ROUNDS >= 1 && ROUNDS <= 100)) || die "BENCH_ROUNDS must be 1..100 (got '$ROUNDS')"
read -ra CONNS <<<"$CONNS_LIST"
((${#CONNS[@]} >= 1)) || die "BENCH_CONNS is empty"
for c in "${CONNS[@]}"; do
    is_uint "$c" && ((c >= THREADS)) || die "BENCH_CONNS entries must be integers >= BENCH_THREADS (got '$c')"
done
DURATION_S="$(duration_seconds "$DURATION")" && ((DURATION_S >= 1)) \
    || die "BENCH_DURATION must look like 10s, 2m or 10 (got '$DURATION')"
if [[ "$WARMUP" == 0 || "$WARMUP" == 0s ]]; then
    WARMUP_S=0
else
    WARMUP_S="$(duration_seconds "$WARMUP")" || die "BENCH_WARMUP must look like 2s or 0 (got '$WARMUP')"
fi

# ---------------------------------------------------------------- tools

ensure_tools() {
    local missing=()
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
        local sudo=()
        if ((EUID != 0)); then
            command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}; run as root or install them"
            sudo=(sudo)
        fi
        log "installing ${missing[*]}"
        # RUNLEVEL=1 keeps invoke-rc.d from starting the packaged nginx service.
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
                apt-get install -y -q "${missing[@]}" >&2; then
            log "install failed; refreshing package lists (apt-get update) and retrying"
            "${sudo[@]}" apt-get update -q >&2
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
                apt-get install -y -q "${missing[@]}" >&2
        fi
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required (port selection and the report)"
    command -v cargo >/dev/null 2>&1 || die "cargo is required"
    command -v timeout >/dev/null 2>&1 || die "timeout (coreutils) is required"
}
ensure_tools
NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
CLK_TCK="$(getconf CLK_TCK)"

# ---------------------------------------------------------------- cleanup

WORK="$(mktemp -d "${TMPDIR:-/tmp}/stepgate-bench.XXXXXX")"
PIDS=()          # every background process we started, stopped in reverse order
KEEP_WORK="${BENCH_KEEP_LOGS:-0}"   # 1: keep the temp dir (configs, logs) even on success
[[ "$KEEP_WORK" == 0 || "$KEEP_WORK" == 1 ]] || KEEP_WORK=1

stop_pid() {
    local pid="$1" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do           # up to 5 s to exit gracefully
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    # Keep the logs after a failure (not after Ctrl-C / TERM) for inspection.
    if ((KEEP_WORK || (status != 0 && status != 130 && status != 143))); then
        log "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# http_ok PORT: exit 0 when GET / answers 200.
http_ok() {
    python3 - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

# wait_ready NAME PID PORT LOG: up to ~10 s for 200 on GET /; fail with the log.
wait_ready() {
    local name="$1" pid="$2" port="$3" logfile="$4" i
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during start-up; its log ($logfile):"
            sed 's/^/    /' "$logfile" >&2 || true
            return 1
        fi
        http_ok "$port" && return 0
        sleep 0.1
    done
    log "$name did not answer 200 on 127.0.0.1:$port within 10 s; its log ($logfile):"
    sed 's/^/    /' "$logfile" >&2 || true
    return 1
}

# cpu_ticks PID: utime + stime (all threads) in clock ticks.
cpu_ticks() {
    local stat rest f
    stat="$(<"/proc/$1/stat")"
    rest="${stat##*) }"          # drop "pid (comm) ", comm may contain spaces
    read -ra f <<<"$rest"        # f[0] is field 3 (state): utime=14, stime=15
    echo $((f[11] + f[12]))
}

vm_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

# ---------------------------------------------------------------- build

log "building the gateway (cargo build --release)"
(cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
GATEWAY_BIN="$ROOT/target/release/stepgate"
[[ -x "$GATEWAY_BIN" ]] || die "$GATEWAY_BIN not found after the build"

# ---------------------------------------------------------------- upstream: nginx

start_nginx() {
    local dir="$WORK/nginx" attempt
    mkdir -p "$dir/tmp" "$dir/logs"
    for ((attempt = 1; attempt <= 3; attempt++)); do
        UPSTREAM_PORT="$(free_port)"
        # master_process off: a single process that is the worker, so its PID is
        # the one whose CPU time we read.
        cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { return 200 "ok\n"; }
    }
}
EOF
        "$NGINX_BIN" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
            >"$dir/logs/stdout.log" 2>&1 &
        NGINX_PID=$!
        PIDS+=("$NGINX_PID")
        if wait_ready nginx "$NGINX_PID" "$UPSTREAM_PORT" "$dir/logs/error.log"; then
            return 0
        fi
        stop_pid "$NGINX_PID"
        grep -qi 'address already in use' "$dir/logs/error.log" "$dir/logs/stdout.log" 2>/dev/null \
            || break
        log "port $UPSTREAM_PORT was taken meanwhile; retrying"
    done
    die "nginx failed to start (config: $dir/nginx.conf)"
}

# ---------------------------------------------------------------- gateway

start_gateway() {
    local dir="$WORK/gateway" attempt
    mkdir -p "$dir/policies"
    cat >"$dir/policies/public.yaml" <<EOF
api_key: off
second_factor: off
EOF
    for ((attempt = 1; attempt <= 3; attempt++)); do
        GATEWAY_PORT="$(free_port)"
        cat >"$dir/gateway.yaml" <<EOF
listen: 127.0.0.1:$GATEWAY_PORT
upstreams:
  nginx: { url: "http://127.0.0.1:$UPSTREAM_PORT", connect_timeout: 2s, timeout: 30s }
routes:
  - { name: bench, match: { path: / }, upstream: nginx, policy: public }
EOF
        RUST_LOG=warn "$GATEWAY_BIN" run -c "$dir/gateway.yaml" --log-format json \
            >"$dir/gateway.log" 2>&1 &
        GATEWAY_PID=$!
        PIDS+=("$GATEWAY_PID")
        if wait_ready stepgate "$GATEWAY_PID" "$GATEWAY_PORT" "$dir/gateway.log"; then
            return 0
        fi
        stop_pid "$GATEWAY_PID"
        grep -qi 'in use' "$dir/gateway.log" 2>/dev/null || break
        log "port $GATEWAY_PORT was taken meanwhile; retrying"
    done
    die "stepgate failed to start (config: $dir/gateway.yaml, log above)"
}

start_nginx
log "nginx (pid $NGINX_PID) on 127.0.0.1:$UPSTREAM_PORT"
start_gateway
log "stepgate (pid $GATEWAY_PID) on 127.0.0.1:$GATEWAY_PORT -> nginx"

# ---------------------------------------------------------------- load

RUNS_TSV="$WORK/runs.tsv"
: >"$RUNS_TSV"

# run_wrk CONNS DURATION PORT OUT: wrk in the background under a watchdog, so
# the trap can stop it and it can never outlive its duration by much.
run_wrk() {
    local conns="$1" duration="$2" port="$3" out="$4" secs
    secs="$(duration_seconds "$duration")"
    timeout -s KILL $((secs + 30)) \
        wrk -t"$THREADS" -c"$conns" -d"$duration" --latency "http://127.0.0.1:$port/" \
        >"$out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local rc=0
    wait "$pid" || rc=$?
    unset 'PIDS[${#PIDS[@]}-1]'
    if ((rc != 0)); then
        log "wrk failed (exit $rc):"
        sed 's/^/    /' "$out" >&2
        return 1
    fi
}

# measure TARGET CONNS ROUND
measure() {
    local target="$1" conns="$2" round="$3" port pid before after out
    case "$target" in
        direct)  port="$UPSTREAM_PORT"; pid="$NGINX_PID" ;;
        gateway) port="$GATEWAY_PORT";  pid="$GATEWAY_PID" ;;
    esac
    kill -0 "$GATEWAY_PID" 2>/dev/null || die "stepgate died; log: $WORK/gateway/gateway.log"
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx died; log: $WORK/nginx/logs/error.log"
    out="$WORK/wrk-$target-c$conns-r$round.txt"
    log "round $round/$ROUNDS  $target  c=$conns  $DURATION"
    before="$(cpu_ticks "$pid")"
    run_wrk "$conns" "$DURATION" "$port" "$out"
    after="$(cpu_ticks "$pid")"
    printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$conns" "$round" "$((after - before))" "$out" >>"$RUNS_TSV"
}

for conns in "${CONNS[@]}"; do
    if ((WARMUP_S > 0)); then
        log "warm-up c=$conns ${WARMUP} each (not reported)"
        run_wrk "$conns" "$WARMUP" "$UPSTREAM_PORT" "$WORK/warmup-direct-c$conns.txt"
        run_wrk "$conns" "$WARMUP" "$GATEWAY_PORT" "$WORK/warmup-gateway-c$conns.txt"
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        measure direct "$conns" "$round"
        measure gateway "$conns" "$round"
    done
done

GATEWAY_HWM_KIB="$(vm_hwm_kib "$GATEWAY_PID")"

# ---------------------------------------------------------------- report

mkdir -p "$RESULTS_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
REPORT="$RESULTS_DIR/$STAMP-proxy.md"
RAW="$RESULTS_DIR/$STAMP-proxy.raw"

COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$COMMIT" != unknown ]] && [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    COMMIT="$COMMIT (working tree modified)"
fi

python3 "$BENCH_DIR/report.py" \
    --runs "$RUNS_TSV" \
    --clk-tck "$CLK_TCK" \
    --gateway-hwm-kib "$GATEWAY_HWM_KIB" \
    --meta "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    --meta "commit=$COMMIT" \
    --meta "nproc=$(nproc)" \
    --meta "kernel=$(uname -sr)" \
    --meta "wrk=-t$THREADS -c{$CONNS_LIST} -d$DURATION --latency, $ROUNDS rounds, warm-up $WARMUP" \
    --meta "nginx=$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')" \
    --meta "rustc=$(rustc --version 2>/dev/null || echo unknown)" \
    --raw-out "$RAW" \
    >"$REPORT"

cat "$REPORT"
log "report written to ${REPORT#"$ROOT"/} (raw wrk output: ${RAW#"$ROOT"/})"
