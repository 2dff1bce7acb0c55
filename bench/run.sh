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

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

THREADS="${BENCH_THREADS:-1}"
CONNS_LIST="${BENCH_CONNS:-64}"
DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-3}"
WARMUP="${BENCH_WARMUP:-2s}"   # per target and connection count, not reported; 0 disables

# ---------------------------------------------------------------- arguments

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

ensure_tools
bench_setup_work stepgate-bench
build_gateway

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
        forget_pid "$GATEWAY_PID"
        grep -qi 'in use' "$dir/gateway.log" 2>/dev/null || break
        log "port $GATEWAY_PORT was taken meanwhile; retrying"
    done
    die "stepgate failed to start (config: $dir/gateway.yaml, log above)"
}

start_upstream
log "nginx (pid $NGINX_PID) on 127.0.0.1:$UPSTREAM_PORT"
start_gateway
log "stepgate (pid $GATEWAY_PID) on 127.0.0.1:$GATEWAY_PORT -> nginx"

# ---------------------------------------------------------------- load

RUNS_TSV="$WORK/runs.tsv"
: >"$RUNS_TSV"

# run_wrk CONNS DURATION PORT OUT
run_wrk() {
    local conns="$1" duration="$2" port="$3" out="$4"
    run_wrk_fg "$out" "$(duration_seconds "$duration")" \
        -t"$THREADS" -c"$conns" -d"$duration" --latency "http://127.0.0.1:$port/"
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

COMMIT="$(commit_desc)"

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
