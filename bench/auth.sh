#!/usr/bin/env bash
# The auth-path benchmark: stepgate's API-key, step-up-token and code paths and a
# brute-force flood, against nginx direct and nginx doing an API-key `map` check, with
# the same wrk settings, alternating over rounds. See bench/README.md.
#
#   bench/auth.sh
#   BENCH_ROUNDS=1 BENCH_DURATION=5s BENCH_CONNS=64 bench/auth.sh     # quick check
#
# Everything runs on 127.0.0.1 with ports chosen at run time. Every process started here
# is stopped on exit (normal, error or Ctrl-C).
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LUA_DIR="$BENCH_DIR/lua"

THREADS="${BENCH_THREADS:-1}"
WORKERS="${BENCH_WORKERS:-2}"                       # the gateway's worker threads = nginx (b)'s worker processes
CONNS_LIST="${BENCH_CONNS:-64 256}"
DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-3}"
WARMUP="${BENCH_WARMUP:-2s}"                        # per target and connection count; 0 disables
CONSUMERS="${BENCH_CONSUMERS:-10000}"               # (b), (c), (d): keys; (d): step-up tokens
CODE_CONSUMERS="${BENCH_CODE_CONSUMERS:-0}"         # (e): 0 = the CONSUMERS above; else a separate pool
FLOOD_CONSUMERS="${BENCH_FLOOD_CONSUMERS:-1000}"    # (f): keys the flood sends wrong codes for
LEGIT_CONNS="${BENCH_LEGIT_CONNS:-8}"               # (f): legitimate (d) traffic ...
LEGIT_RATE="${BENCH_LEGIT_RATE:-1000}"              # ... paced to about this many req/s; 0: flat out
FLOOD_CONNS="${BENCH_FLOOD_CONNS:-256}"             # (f): the flood ...
FLOOD_RATE="${BENCH_FLOOD_RATE:-20000}"             # ... paced to about this many req/s; 0: flat out
FLOOD_NICE="${BENCH_FLOOD_NICE:-19}"                # ... its wrk at this nice level (0: like the rest)
SEED_WORKERS="${BENCH_SEED_WORKERS:-12}"
PICK="${BENCH_PICK:-rr}"                            # rr | random: how lines.lua picks a consumer

# ---------------------------------------------------------------- arguments

is_uint "$THREADS" && ((THREADS >= 1 && THREADS <= 64)) || die "BENCH_THREADS must be 1..64 (got '$THREADS')"
is_uint "$ROUNDS" && ((ROUNDS >= 1 && ROUNDS <= 100)) || die "BENCH_ROUNDS must be 1..100 (got '$ROUNDS')"
read -ra CONNS <<<"$CONNS_LIST"
((${#CONNS[@]} >= 1 && ${#CONNS[@]} <= 10)) || die "BENCH_CONNS must list 1..10 connection counts"
for c in "${CONNS[@]}" "$LEGIT_CONNS" "$FLOOD_CONNS"; do
    is_uint "$c" && ((c >= THREADS && c <= 10000)) \
        || die "connection counts must be integers in BENCH_THREADS..10000 (got '$c')"
done
DURATION_S="$(duration_seconds "$DURATION")" && ((DURATION_S >= 1)) \
    || die "BENCH_DURATION must look like 10s, 2m or 10 (got '$DURATION')"
if [[ "$WARMUP" == 0 || "$WARMUP" == 0s ]]; then
    WARMUP_S=0
else
    WARMUP_S="$(duration_seconds "$WARMUP")" || die "BENCH_WARMUP must look like 2s or 0 (got '$WARMUP')"
fi
for v in CONSUMERS FLOOD_CONSUMERS; do
    is_uint "${!v}" && ((${!v} >= 1 && ${!v} <= 99999)) || die "BENCH_$v must be 1..99999 (got '${!v}')"
done
is_uint "$CODE_CONSUMERS" && ((CODE_CONSUMERS <= 99999)) || die "BENCH_CODE_CONSUMERS must be 0..99999 (got '$CODE_CONSUMERS')"
if ((CODE_CONSUMERS > 0)); then
    CODES_DESC="$CODE_CONSUMERS separate ones for codes"
else
    CODES_DESC="the same $CONSUMERS for codes (e), each at a later time step than its last"
fi
((CONSUMERS >= 10000)) || log "note: BENCH_CONSUMERS=$CONSUMERS is below the 10,000 the targets are set for"
is_uint "$LEGIT_RATE" && ((LEGIT_RATE <= 1000000)) || die "BENCH_LEGIT_RATE must be 0..1000000 (got '$LEGIT_RATE')"
# wrk's delay() hook: each legitimate connection pauses this long (ms) before each request,
# so LEGIT_CONNS connections send at most about LEGIT_RATE req/s (a little less: the
# response time adds to the pause). 0 = closed loop, as fast as the gateway answers.
LEGIT_DELAY_MS=0
if ((LEGIT_RATE > 0)); then
    LEGIT_DELAY_MS=$(((LEGIT_CONNS * 1000 + LEGIT_RATE / 2) / LEGIT_RATE))
    ((LEGIT_DELAY_MS >= 1)) || LEGIT_DELAY_MS=1
fi
is_uint "$FLOOD_RATE" && ((FLOOD_RATE <= 10000000)) || die "BENCH_FLOOD_RATE must be 0..10000000 (got '$FLOOD_RATE')"
FLOOD_DELAY_MS=0
if ((FLOOD_RATE > 0)); then
    FLOOD_DELAY_MS=$(((FLOOD_CONNS * 1000 + FLOOD_RATE / 2) / FLOOD_RATE))
    ((FLOOD_DELAY_MS >= 1)) || FLOOD_DELAY_MS=1
fi
is_uint "$FLOOD_NICE" && ((FLOOD_NICE <= 19)) || die "BENCH_FLOOD_NICE must be 0..19 (got '$FLOOD_NICE')"
is_uint "$SEED_WORKERS" && ((SEED_WORKERS >= 1 && SEED_WORKERS <= 64)) || die "BENCH_SEED_WORKERS must be 1..64"
is_uint "$WORKERS" && ((WORKERS >= 1 && WORKERS <= 64)) || die "BENCH_WORKERS must be 1..64"
[[ "$PICK" == rr || "$PICK" == random ]] || die "BENCH_PICK must be rr or random (got '$PICK')"
# (e)'s codes are valid for at least 30 s after they are computed (seed.py codes).
E_DURATION_S=$((DURATION_S < 25 ? DURATION_S : 25))

ensure_tools
bench_setup_work stepgate-auth-bench
build_gateway
DATA="$WORK/data"          # keys, tokens, code pool (secrets: temp dir only)
mkdir -p "$DATA"

# ---------------------------------------------------------------- processes

start_upstream
log "upstream nginx (pid $NGINX_PID) on 127.0.0.1:$UPSTREAM_PORT"

start_gateway() {
    local dir="$WORK/gateway" attempt
    mkdir -p "$dir/policies" "$dir/data"
    cat >"$dir/policies/bench-public.yaml" <<EOF
api_key: off
second_factor: off
EOF
    cat >"$dir/policies/bench-key.yaml" <<EOF
api_key: required
second_factor: off
EOF
    # failures: the defaults (5 per consumer, 50 per IP in 15 min, 15 min ban), so the
    # flood's consumers are banned after a handful of attempts.
    cat >"$dir/policies/bench-2fa.yaml" <<EOF
api_key: required
second_factor: required
step_up: { ttl: 1h, scope: policy }
EOF
    for ((attempt = 1; attempt <= 3; attempt++)); do
        GATEWAY_PORT="$(free_port)"
        ADMIN_PORT="$(free_port)"
        [[ "$ADMIN_PORT" != "$GATEWAY_PORT" ]] || continue
        { gateway_yaml_head "$dir"; cat <<EOF; } >"$dir/gateway.yaml"
# The flood's X-Forwarded-For names fake client addresses; legitimate traffic sends none.
trusted_proxies: [127.0.0.1/32]
limits: { workers: $WORKERS }
upstreams:
  nginx: { url: "http://127.0.0.1:$UPSTREAM_PORT", connect_timeout: 2s, timeout: 30s }
routes:
  - { name: ready, match: { path: /ready }, upstream: nginx, policy: bench-public }
  - { name: direct-key, match: { path: /direct-key }, upstream: nginx, policy: bench-key }
  - { name: stepup, match: { path: /stepup }, upstream: nginx, policy: bench-2fa }
  # The flood's own route, same policy (bans are per client IP / consumer, across routes);
  # it only keeps its counts apart from the legitimate traffic's in the metrics.
  - { name: flood, match: { path: /flood }, upstream: nginx, policy: bench-2fa }
EOF
        env -u STEPGATE_ADMIN_TOKEN -u STEPGATE_MASTER_KEY RUST_LOG=warn \
            "$GATEWAY_BIN" run -c "$dir/gateway.yaml" --log-format json >"$dir/gateway.log" 2>&1 &
        GATEWAY_PID=$!
        PIDS+=("$GATEWAY_PID")
        if wait_ready stepgate "$GATEWAY_PID" "$GATEWAY_PORT" "$dir/gateway.log" /ready 200 \
            && wait_ready "stepgate admin" "$GATEWAY_PID" "$ADMIN_PORT" "$dir/gateway.log" /healthz 200; then
            ADMIN_TOKEN_FILE="$dir/data/admin.token"
            [[ -s "$ADMIN_TOKEN_FILE" ]] || die "no admin token in $ADMIN_TOKEN_FILE"
            return 0
        fi
        stop_pid "$GATEWAY_PID"
        forget_pid "$GATEWAY_PID"
        grep -qi 'in use' "$dir/gateway.log" 2>/dev/null || break
        log "a port was taken meanwhile; retrying"
    done
    die "stepgate failed to start (config: $dir/gateway.yaml, log above)"
}

start_gateway
log "stepgate (pid $GATEWAY_PID) on 127.0.0.1:$GATEWAY_PORT, admin on 127.0.0.1:$ADMIN_PORT"

# log_lines: lines stepgate has logged so far (RUST_LOG=warn: warnings and errors only).
log_lines() { wc -l <"$WORK/gateway/gateway.log"; }

# metrics_snapshot FILE: the gateway's Prometheus text (counts by route and status).
metrics_snapshot() {
    python3 - "$ADMIN_PORT" "$ADMIN_TOKEN_FILE" "$1" <<'PY'
import sys, urllib.request
port, token_file, out = sys.argv[1:4]
token = open(token_file).read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                             headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, timeout=10) as r:
    open(out, "wb").write(r.read())
PY
}

# ---------------------------------------------------------------- seeding

log "seeding: $CONSUMERS consumers with step-up tokens, $CODES_DESC, $FLOOD_CONSUMERS for the flood"
SEED_T0="$(date +%s.%N)"
run_waited python3 "$BENCH_DIR/seed.py" seed \
    --admin-port "$ADMIN_PORT" --admin-token-file "$ADMIN_TOKEN_FILE" \
    --gateway-port "$GATEWAY_PORT" --out "$DATA" \
    --tokens "$CONSUMERS" --codes "$CODE_CONSUMERS" --flood "$FLOOD_CONSUMERS" \
    --workers "$SEED_WORKERS" \
    || die "seeding failed (gateway log: $WORK/gateway/gateway.log)"
SEED_LOG_LINES="$(log_lines)"
SEED_SECONDS="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$SEED_T0" "$(date +%s.%N)")"
settle "$GATEWAY_PID"
SEED_RSS_KIB="$(vm_rss_kib "$GATEWAY_PID")"
SEED_HWM_KIB="$(vm_hwm_kib "$GATEWAY_PID")"
metrics_snapshot "$WORK/metrics-after-seed.txt"
log "seeded in ${SEED_SECONDS} s; stepgate RSS $((SEED_RSS_KIB / 1024)) MiB (peak $((SEED_HWM_KIB / 1024)) MiB)"

FIRST_KEY="$(head -n1 "$DATA/keys.txt")"
read -r FIRST_TKEY FIRST_TOKEN <"$DATA/tokens.txt"

# ---------------------------------------------------------------- (b) nginx with a key map

mkdir -p "$WORK/proxy"
sed 's/.*/        "&" 1;/' "$DATA/keys.txt" >"$WORK/proxy/keys.map"
# As many nginx worker processes as the gateway has worker threads: like for like.
NGINX_KEYMAP_WORKERS="$WORKERS" start_nginx_with "nginx proxy" "$WORK/proxy" nginx_keymap_conf /direct-key 200 "X-Api-Key: $FIRST_KEY"
PROXY_PID="$NGINX_STARTED_PID"
PROXY_PORT="$NGINX_STARTED_PORT"
log "nginx key-map proxy (pid $PROXY_PID) on 127.0.0.1:$PROXY_PORT"

# ---------------------------------------------------------------- sanity checks

check_status() {
    local what="$1" want="$2" got
    shift 2
    got="$(http_status "$@")"
    [[ "$got" == "$want" ]] || die "sanity check failed: $what answered $got, expected $want"
}
check_status "(b) without a key" 401 "$PROXY_PORT" /direct-key
check_status "(b) with a key" 200 "$PROXY_PORT" /direct-key "X-Api-Key: $FIRST_KEY"
check_status "(c) without a key" 401 "$GATEWAY_PORT" /direct-key
check_status "(c) with a key" 200 "$GATEWAY_PORT" /direct-key "X-Api-Key: $FIRST_KEY"
check_status "(d) with a key only" 401 "$GATEWAY_PORT" /stepup "X-Api-Key: $FIRST_TKEY"
check_status "(d) with key + token" 200 "$GATEWAY_PORT" /stepup "X-Api-Key: $FIRST_TKEY" "X-Step-Up-Token: $FIRST_TOKEN"

# ---------------------------------------------------------------- runs

RUNS_TSV="$WORK/runs.tsv"
: >"$RUNS_TSV"

# wrk_args SCEN CONNS DURATION: sets WRK_ARGS, the wrk command line (without `wrk`).
wrk_args() {
    local scen="$1" conns="$2" dur="$3" target
    WRK_ARGS=(-t"$THREADS" -c"$conns" -d"$dur" --latency)
    case "$scen" in
        # (a) sends the same key header as (b) and (c) through the same script, so wrk's own
        # work per request is the same in all three; nginx ignores it.
        a) target="$UPSTREAM_PORT" ;;
        b | f-control) target="$PROXY_PORT" ;;
        *) target="$GATEWAY_PORT" ;;
    esac
    case "$scen" in
        a | b | c)
            WRK_ARGS+=(-s "$LUA_DIR/lines.lua" "http://127.0.0.1:$target/direct-key"
                -- "$DATA/keys.txt" /direct-key "$PICK" "$THREADS" 0 X-Api-Key) ;;
        d)
            WRK_ARGS+=(-s "$LUA_DIR/lines.lua" "http://127.0.0.1:$target/stepup"
                -- "$DATA/tokens.txt" /stepup "$PICK" "$THREADS" 0 X-Api-Key X-Step-Up-Token) ;;
        f-unloaded | f-legit)
            WRK_ARGS+=(-s "$LUA_DIR/lines.lua" "http://127.0.0.1:$target/stepup"
                -- "$DATA/tokens.txt" /stepup "$PICK" "$THREADS" "$LEGIT_DELAY_MS" X-Api-Key X-Step-Up-Token) ;;
        e)
            WRK_ARGS+=(-s "$LUA_DIR/codes.lua" "http://127.0.0.1:$target/stepup"
                -- "$DATA/codes.txt" /stepup "$THREADS") ;;
        f-flood | f-control)
            WRK_ARGS+=(-s "$LUA_DIR/flood.lua" "http://127.0.0.1:$target/flood"
                -- "$DATA/flood-keys.txt" /flood "$THREADS" "$FLOOD_DELAY_MS") ;;
        *) die "unknown scenario $scen" ;;
    esac
}

scenario_pid() {
    case "$1" in
        a) echo "$NGINX_PID" ;;
        b) echo "$PROXY_PID" ;;
        *) echo "$GATEWAY_PID" ;;
    esac
}

all_alive() {
    kill -0 "$GATEWAY_PID" 2>/dev/null || die "stepgate died; log: $WORK/gateway/gateway.log"
    kill -0 "$NGINX_PID" 2>/dev/null || die "upstream nginx died; log: $WORK/nginx/logs/error.log"
    kill -0 "$PROXY_PID" 2>/dev/null || die "nginx proxy died; log: $WORK/proxy/logs/error.log"
}

# measure SCEN CONNS ROUND: one wrk run, with the process under test's CPU time, peak RSS
# (reset before the run when the kernel allows) and, for stepgate, its metrics around it.
measure() {
    local scen="$1" conns="$2" round="$3" pid dur secs out m0="-" m1="-" before after hwm_reset=1 log0
    all_alive
    pid="$(scenario_pid "$scen")"
    dur="$DURATION"
    secs="$DURATION_S"
    if [[ "$scen" == e ]]; then
        run_waited python3 "$BENCH_DIR/seed.py" codes --state "$DATA/code-pool.tsv" --out "$DATA/codes.txt" \
            || die "preparing the codes for (e) failed"
        dur="${E_DURATION_S}s"
        secs="$E_DURATION_S"
    fi
    out="$WORK/wrk-$scen-c$conns-r$round.txt"
    log "round $round/$ROUNDS  ($scen)  c=$conns  $dur"
    if [[ "$pid" == "$GATEWAY_PID" ]]; then
        m0="$WORK/metrics-$scen-c$conns-r$round-before.txt"
        m1="$WORK/metrics-$scen-c$conns-r$round-after.txt"
        metrics_snapshot "$m0"
    fi
    log0="$(log_lines)"
    reset_hwm "$pid" || hwm_reset=0
    before="$(cpu_ticks "$pid")"
    wrk_args "$scen" "$conns" "$dur"
    run_wrk_fg "$out" "$secs" "${WRK_ARGS[@]}"
    # Work the run left behind (e.g. the audit events of (e), written in the background)
    # belongs to it.
    settle "$pid"
    after="$(cpu_ticks "$pid")"
    [[ "$m1" == - ]] || metrics_snapshot "$m1"
    printf 'scen=%s\tconns=%s\tround=%s\tticks=%s\thwm_kib=%s\thwm_reset=%s\twrk=%s\tm0=%s\tm1=%s\tlog=%s\n' \
        "$scen" "$conns" "$round" "$((after - before))" "$(vm_hwm_kib "$pid")" "$hwm_reset" \
        "$out" "$m0" "$m1" "$(($(log_lines) - log0))" >>"$RUNS_TSV"
}

# measure_flood SCEN ROUND: (f) legitimate (d) traffic at LEGIT_CONNS and the flood at
# FLOOD_CONNS, started together for the same duration. SCEN f-flood aims the flood at
# stepgate; f-control aims the same flood at nginx (b), which refuses all of it (its map
# does not hold the flood's keys) without the upstream: the legitimate traffic, still
# through stepgate, then shares the machine with the same load that the gateway does not
# handle. The CPU recorded is that of whoever refuses the flood.
measure_flood() {
    local scen="$1" round="$2" out_l out_f m0 m1 before after hwm_reset=1 lpid fpid log0
    local pid="$GATEWAY_PID"
    [[ "$scen" == f-control ]] && pid="$PROXY_PID"
    all_alive
    out_l="$WORK/wrk-$scen-legit-c$LEGIT_CONNS-r$round.txt"
    out_f="$WORK/wrk-$scen-c$FLOOD_CONNS-r$round.txt"
    m0="$WORK/metrics-$scen-r$round-before.txt"
    m1="$WORK/metrics-$scen-r$round-after.txt"
    log "round $round/$ROUNDS  ($scen) legit c=$LEGIT_CONNS + flood c=$FLOOD_CONNS  $DURATION"
    metrics_snapshot "$m0"
    log0="$(log_lines)"
    reset_hwm "$pid" || hwm_reset=0
    before="$(cpu_ticks "$pid")"
    wrk_args f-legit "$LEGIT_CONNS" "$DURATION"
    run_wrk_bg "$out_l" "$DURATION_S" "${WRK_ARGS[@]}"
    lpid="$WRK_PID"
    wrk_args "$scen" "$FLOOD_CONNS" "$DURATION"
    # The attacker's CPU is not the gateway's: at equal priority its wrk would take turns
    # with the gateway and the legitimate client for the same two cores (see bench/README.md).
    WRK_NICE="$FLOOD_NICE" run_wrk_bg "$out_f" "$DURATION_S" "${WRK_ARGS[@]}"
    fpid="$WRK_PID"
    wait_wrk "$lpid" "$out_l"
    wait_wrk "$fpid" "$out_f"
    settle "$pid"
    after="$(cpu_ticks "$pid")"
    metrics_snapshot "$m1"
    printf 'scen=%s\tconns=%s\tround=%s\tticks=%s\thwm_kib=%s\thwm_reset=%s\twrk=%s\tm0=%s\tm1=%s\tlog=%s\twrk2=%s\tconns2=%s\n' \
        "$scen" "$LEGIT_CONNS" "$round" "$((after - before))" "$(vm_hwm_kib "$pid")" "$hwm_reset" \
        "$out_l" "$m0" "$m1" "$(($(log_lines) - log0))" "$out_f" "$FLOOD_CONNS" >>"$RUNS_TSV"
}

if ((WARMUP_S > 0)); then
    for conns in "${CONNS[@]}"; do
        for scen in a b c d; do
            log "warm-up ($scen) c=$conns $WARMUP (not reported)"
            wrk_args "$scen" "$conns" "$WARMUP"
            run_wrk_fg "$WORK/warmup-$scen-c$conns.txt" "$WARMUP_S" "${WRK_ARGS[@]}"
        done
    done
    settle "$GATEWAY_PID"
fi

SCENARIOS=(a b c d e)
for ((round = 1; round <= ROUNDS; round++)); do
    for conns in "${CONNS[@]}"; do
        # A different order each round, so drift and noise spread over every column.
        for ((k = 0; k < ${#SCENARIOS[@]}; k++)); do
            measure "${SCENARIOS[(k + round - 1) % ${#SCENARIOS[@]}]}" "$conns" "$round"
        done
    done
    if ((round % 2)); then
        measure f-unloaded "$LEGIT_CONNS" "$round"
        measure_flood f-control "$round"
        measure_flood f-flood "$round"
    else
        measure_flood f-flood "$round"
        measure_flood f-control "$round"
        measure f-unloaded "$LEGIT_CONNS" "$round"
    fi
done

all_alive
metrics_snapshot "$WORK/metrics-final.txt"
FINAL_RSS_KIB="$(vm_rss_kib "$GATEWAY_PID")"

# ---------------------------------------------------------------- report

mkdir -p "$RESULTS_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
REPORT="$RESULTS_DIR/$STAMP-auth.md"
RAW="$RESULTS_DIR/$STAMP-auth.raw"

python3 "$BENCH_DIR/auth_report.py" \
    --runs "$RUNS_TSV" \
    --clk-tck "$CLK_TCK" \
    --gateway-log "$WORK/gateway/gateway.log" \
    --metrics-seed "$WORK/metrics-after-seed.txt" \
    --metrics-final "$WORK/metrics-final.txt" \
    --meta "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    --meta "commit=$(commit_desc)" \
    --meta "nproc=$(nproc)" \
    --meta "workers=$WORKERS" \
    --meta "kernel=$(uname -sr)" \
    --meta "wrk=-t$THREADS -c{$CONNS_LIST} -d$DURATION --latency, $ROUNDS rounds, warm-up $WARMUP, consumers picked $PICK" \
    --meta "flood=legit (d) traffic -c$LEGIT_CONNS paced with ${LEGIT_DELAY_MS} ms per connection before each request (target ~$LEGIT_RATE req/s; 0 = flat out) + flood -c$FLOOD_CONNS paced with ${FLOOD_DELAY_MS} ms per connection before each request (target ~$FLOOD_RATE req/s; 0 = flat out) by a wrk at nice $FLOOD_NICE, $FLOOD_CONSUMERS flood consumers, random X-Forwarded-For in 10.0.0.0/8" \
    --meta "consumers=$CONSUMERS with step-up tokens (also the keys of b and c), $CODES_DESC, $FLOOD_CONSUMERS for the flood" \
    --meta "seed=${SEED_SECONDS} s ($SEED_LOG_LINES stepgate log lines); stepgate RSS after seeding $((SEED_RSS_KIB / 1024)) MiB (peak $((SEED_HWM_KIB / 1024)) MiB); at the end $((FINAL_RSS_KIB / 1024)) MiB" \
    --meta "nginx=$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')" \
    --meta "rustc=$(rustc --version 2>/dev/null || echo unknown)" \
    --raw-out "$RAW" \
    >"$WORK/report.md" || die "the report failed (runs: $RUNS_TSV)"
mv "$WORK/report.md" "$REPORT"

cat "$REPORT"
log "report written to ${REPORT#"$ROOT"/} (raw wrk output: ${RAW#"$ROOT"/})"
