#!/usr/bin/env bash
# Cluster mode against one node, in one run: the key + step-up token route (the hot path) and
# fresh codes (the replay check in the store) on a gateway on SQLite (S) and on gateways on
# one Redis (R1, R2), the same build, the same worker count, the same nginx `return 200`
# upstream and wrk settings, alternating over rounds. See bench/README.md.
#
#   bench/cluster.sh
#   BENCH_ROUNDS=1 BENCH_DURATION=5s bench/cluster.sh          # quick check
#   BENCH_CALLGRIND=1 bench/cluster.sh   # also instructions per request on both stores
#
# Runs: (d) key + token on S, on R1, and on R1 + R2 at once (two wrk, half the connections
# each: what a balancer in front of two nodes sees); (e) one fresh TOTP code per consumer on
# S and on R1. For each: req/s, CPU time of the gateway per request, and on Redis the number
# of Redis commands the run caused per request (0 on the hot path: it stays in memory).
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LUA_DIR="$BENCH_DIR/lua"

CONNS="${BENCH_CONNS:-64}"
DURATION="${BENCH_DURATION:-10s}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONSUMERS="${BENCH_CONSUMERS:-2000}"
WORKERS="${BENCH_WORKERS:-2}"
CALLGRIND="${BENCH_CALLGRIND:-0}"

is_uint "$CONNS" && ((CONNS >= 2 && CONNS <= 10000)) || die "BENCH_CONNS must be 2..10000 (got '$CONNS')"
is_uint "$ROUNDS" && ((ROUNDS >= 1 && ROUNDS <= 100)) || die "BENCH_ROUNDS must be 1..100 (got '$ROUNDS')"
is_uint "$CONSUMERS" && ((CONSUMERS >= 1 && CONSUMERS <= 99999)) || die "BENCH_CONSUMERS must be 1..99999"
is_uint "$WORKERS" && ((WORKERS >= 1 && WORKERS <= 64)) || die "BENCH_WORKERS must be 1..64"
[[ "$CALLGRIND" == 0 || "$CALLGRIND" == 1 ]] || die "BENCH_CALLGRIND must be 0 or 1"
DURATION_S="$(duration_seconds "$DURATION")" && ((DURATION_S >= 1)) || die "BENCH_DURATION must look like 10s"
# (e)'s codes are valid for at least 30 s after they are computed (seed.py codes).
E_DURATION_S=$((DURATION_S < 25 ? DURATION_S : 25))

ensure_tools
command -v redis-server >/dev/null 2>&1 || die "redis-server is not installed (apt-get install redis-server)"
bench_setup_work stepgate-cluster
build_gateway
start_upstream
start_redis
# One master key for the Redis nodes, as an operator shares it.
MASTER_KEY="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

# start_node NAME STORE_YAML: a gateway in $WORK/NAME; sets NODE_PID, NODE_PORT, NODE_ADMIN.
start_node() {
    local name="$1" store="$2" dir="$WORK/$1"
    mkdir -p "$dir/policies" "$dir/data"
    printf 'api_key: required\nsecond_factor: off\n' >"$dir/policies/bench-public.yaml"
    printf 'api_key: off\nsecond_factor: off\n' >"$dir/policies/bench-open.yaml"
    printf 'api_key: required\nsecond_factor: required\nstep_up: { ttl: 1h, scope: policy }\n' \
        >"$dir/policies/bench-2fa.yaml"
    GATEWAY_PORT="$(free_port)"
    ADMIN_PORT="$(free_port)"
    { gateway_yaml_head "$dir"; printf '%s\n' "$store"; cat <<EOF; } >"$dir/gateway.yaml"
limits: { workers: $WORKERS }
upstreams:
  nginx: { url: "http://127.0.0.1:$UPSTREAM_PORT", connect_timeout: 2s, timeout: 30s }
routes:
  - { name: ready, match: { path: /ready }, upstream: nginx, policy: bench-open }
  - { name: stepup, match: { path: /stepup }, upstream: nginx, policy: bench-2fa }
EOF
    env -u STEPGATE_ADMIN_TOKEN STEPGATE_MASTER_KEY="$MASTER_KEY" RUST_LOG=warn \
        "$GATEWAY_BIN" run -c "$dir/gateway.yaml" --log-format json >"$dir/gateway.log" 2>&1 &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    wait_ready "$name" "$NODE_PID" "$GATEWAY_PORT" "$dir/gateway.log" /ready 200 \
        && wait_ready "$name admin" "$NODE_PID" "$ADMIN_PORT" "$dir/gateway.log" /healthz 200 \
        || die "$name failed to start (config: $dir/gateway.yaml)"
    NODE_PORT="$GATEWAY_PORT"
    NODE_ADMIN="$ADMIN_PORT"
}

start_node s "store: { sqlite: { path: $WORK/s/data/stepgate.db } }"
S_PID="$NODE_PID" S_PORT="$NODE_PORT" S_ADMIN="$NODE_ADMIN"
start_node r1 "$(redis_store_yaml)"
R1_PID="$NODE_PID" R1_PORT="$NODE_PORT" R1_ADMIN="$NODE_ADMIN"
start_node r2 "$(redis_store_yaml)"
R2_PID="$NODE_PID" R2_PORT="$NODE_PORT"
log "S (SQLite) pid $S_PID :$S_PORT; R1 pid $R1_PID :$R1_PORT and R2 pid $R2_PID :$R2_PORT on Redis :$REDIS_PORT"

# seed NAME PORT ADMIN: CONSUMERS consumers with TOTP and a step-up token each (seed.py).
seed() {
    mkdir -p "$WORK/$1/seed"
    run_waited python3 "$BENCH_DIR/seed.py" seed \
        --admin-port "$3" --admin-token-file "$WORK/$1/data/admin.token" \
        --gateway-port "$2" --out "$WORK/$1/seed" \
        --tokens "$CONSUMERS" --codes 0 --flood 1 --workers 8 \
        || die "seeding $1 failed (log: $WORK/$1/gateway.log)"
}
log "seeding $CONSUMERS consumers on S and on R1 (R2 shares R1's through Redis)"
seed s "$S_PORT" "$S_ADMIN"
seed r1 "$R1_PORT" "$R1_ADMIN"
read -r KEY TOKEN <"$WORK/r1/seed/tokens.txt"
[[ "$(http_status "$R2_PORT" /stepup "X-Api-Key: $KEY" "X-Step-Up-Token: $TOKEN")" == 200 ]] \
    || die "a token earned on R1 is not accepted by R2"

RUNS="$WORK/runs.tsv"
: >"$RUNS"

# wrk_d OUT PORT CONNS SEED: the key + token route, round robin over the seeded tokens.
wrk_d_bg() {
    run_wrk_bg "$1" "$DURATION_S" -t1 -c"$3" -d"$DURATION" \
        -s "$LUA_DIR/lines.lua" "http://127.0.0.1:$2/stepup" \
        -- "$WORK/$4/seed/tokens.txt" /stepup rr 1 0 X-Api-Key X-Step-Up-Token
}

# measure NAME ROUND KIND PID...: runs KIND (d-s, d-r1, d-both, e-s, e-r1) and records the
# CPU ticks of the gateway processes and the Redis commands it caused.
measure() {
    local name="$1" round="$2" pid ticks0=0 ticks1=0 calls0 calls1 out out2
    shift 2
    log "round $round/$ROUNDS  $name"
    calls0="$(redis_calls)"
    for pid in "$@"; do ticks0=$((ticks0 + $(cpu_ticks "$pid"))); done
    out="$WORK/wrk-$name-r$round.txt"
    out2="-"
    case "$name" in
        d-s) wrk_d_bg "$out" "$S_PORT" "$CONNS" s; wait_wrk "$WRK_PID" "$out" ;;
        d-r1) wrk_d_bg "$out" "$R1_PORT" "$CONNS" r1; wait_wrk "$WRK_PID" "$out" ;;
        d-both)
            out2="$WORK/wrk-$name-b-r$round.txt"
            wrk_d_bg "$out" "$R1_PORT" $((CONNS / 2)) r1
            local first="$WRK_PID"
            wrk_d_bg "$out2" "$R2_PORT" $((CONNS / 2)) r1
            wait_wrk "$first" "$out"
            wait_wrk "$WRK_PID" "$out2"
            ;;
        e-s | e-r1)
            local node="${name#e-}" port="$S_PORT"
            [[ "$node" == r1 ]] && port="$R1_PORT"
            run_waited python3 "$BENCH_DIR/seed.py" codes --state "$WORK/$node/seed/code-pool.tsv" \
                --out "$WORK/$node/seed/codes.txt" || die "preparing codes failed"
            run_wrk_fg "$out" "$E_DURATION_S" -t1 -c"$CONNS" -d"${E_DURATION_S}s" \
                -s "$LUA_DIR/codes.lua" "http://127.0.0.1:$port/stepup" \
                -- "$WORK/$node/seed/codes.txt" /stepup 1
            ;;
    esac
    for pid in "$@"; do settle "$pid"; done
    for pid in "$@"; do ticks1=$((ticks1 + $(cpu_ticks "$pid"))); done
    calls1="$(redis_calls)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$((ticks1 - ticks0))" \
        "$((calls1 - calls0))" "$out" "$out2" >>"$RUNS"
}

for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate which store goes first, so drift on the machine does not favour one.
    if ((round % 2)); then order=(s r1); else order=(r1 s); fi
    for node in "${order[@]}"; do
        if [[ "$node" == s ]]; then measure d-s "$round" "$S_PID"; else measure d-r1 "$round" "$R1_PID"; fi
    done
    measure d-both "$round" "$R1_PID" "$R2_PID"
    for node in "${order[@]}"; do
        if [[ "$node" == s ]]; then measure e-s "$round" "$S_PID"; else measure e-r1 "$round" "$R1_PID"; fi
    done
done

CG_S="-" CG_R="-"
if ((CALLGRIND)); then
    log "instructions per request under callgrind, SQLite then Redis (bench/callgrind-request.sh)"
    for store in sqlite redis; do
        BENCH_STORE="$store" BENCH_OUT="$WORK/callgrind-$store" BENCH_DURATION=5s \
            "$BENCH_DIR/callgrind-request.sh" >"$WORK/callgrind-$store.txt" \
            || die "callgrind-request.sh ($store) failed"
    done
    CG_S="$WORK/callgrind-sqlite.txt" CG_R="$WORK/callgrind-redis.txt"
fi

mkdir -p "$RESULTS_DIR"
REPORT="$RESULTS_DIR/$(date -u +%Y%m%dT%H%M%SZ)-cluster.md"
python3 - "$RUNS" "$CLK_TCK" "$CONSUMERS" "$CONNS" "$DURATION" "$WORKERS" "$(commit_desc)" \
    "$CG_S" "$CG_R" >"$REPORT" <<'PY'
import re, statistics, sys
runs, clk, consumers, conns, duration, workers, commit, cg_s, cg_r = sys.argv[1:]
clk = int(clk)

def wrk(path):
    text = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    non = int(non.group(1)) if non else 0
    codes = [dict(kv.split("=") for kv in line.split()[1:])
             for line in text.splitlines() if line.startswith("BENCH_CODES")]
    if codes:
        used = sum(int(c["used"]) for c in codes)
        first = min(float(c["first"]) for c in codes)
        stops = [float(c["stop"]) for c in codes if c["stop"] != "-"]
        span = (max(stops) - first) if stops else None
        stray = sum(int(c["stray"]) for c in codes)
        if span:
            rps = used / span
        total, non = used, max(0, non - stray)
    return rps, total, non

rows = {}
for line in open(runs):
    name, rnd, ticks, calls, out, out2 = line.rstrip("\n").split("\t")
    rps, total, non = wrk(out)
    if out2 != "-":
        r2, t2, n2 = wrk(out2)
        rps, total, non = rps + r2, total + t2, non + n2
    cpu_us = int(ticks) / clk * 1e6 / max(total, 1)
    rows.setdefault(name, []).append((rps, cpu_us, int(calls) / max(total, 1), non))

def med(name, i):
    return statistics.median(r[i] for r in rows[name])

print("# Cluster mode (Redis) against one node (SQLite)\n")
print(f"- commit: {commit}")
print(f"- {consumers} consumers per store; wrk -t1 -c{conns} -d{duration}; gateways with "
      f"limits.workers {workers}; nginx `return 200` upstream; medians of {len(rows['d-s'])} rounds")
print("- (d) key + step-up token route, round robin over the consumers' tokens; (e) one fresh "
      "TOTP code per consumer (the replay check in the store); both R nodes share one Redis")
print("- Redis commands per request: INFO commandstats over the run, all clients, commands "
      "run inside scripts included; the nodes' heartbeats are in it (a few per second)\n")
print("| run | req/s | CPU µs / request | Redis commands / request | non-2xx |")
print("|---|---:|---:|---:|---:|")
label = {"d-s": "(d) one node, SQLite", "d-r1": "(d) one node of two, Redis",
         "d-both": "(d) two nodes on Redis, half the connections each",
         "e-s": "(e) fresh codes, SQLite", "e-r1": "(e) fresh codes, Redis"}
for name in ["d-s", "d-r1", "d-both", "e-s", "e-r1"]:
    if name in rows:
        # Commands counted on Redis during an S run are the R nodes' heartbeats: not S's.
        calls = "–" if name.endswith("-s") else f"{med(name, 2):.4f}"
        print(f"| {label[name]} | {med(name, 0):,.0f} | {med(name, 1):.1f} | "
              f"{calls} | {sum(r[3] for r in rows[name])} |")
print()
print(f"- (d) Redis / SQLite: req/s {med('d-r1', 0) / med('d-s', 0):.3f}, "
      f"CPU per request {med('d-r1', 1) / med('d-s', 1):.3f}")
print(f"- (e) Redis / SQLite: fresh codes/s {med('e-r1', 0) / med('e-s', 0):.3f}")

def cg(path):
    if path == "-":
        return None
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^\| (\S+) \| (\d+) \|", open(path).read(), re.M)}
s, r = cg(cg_s), cg(cg_r)
if s and r:
    print("\n## Instructions per request (callgrind, whole process, wrk -t1 -c8)\n")
    print("| target | SQLite | Redis | Redis / SQLite |")
    print("|---|---:|---:|---:|")
    for target in ["key", "key-and-token", "refused-banned"]:
        if target in s and target in r:
            print(f"| {target} | {s[target]:,} | {r[target]:,} | {r[target] / s[target]:.3f} |")
PY
cat "$REPORT"
log "report written to ${REPORT#"$ROOT"/}"
