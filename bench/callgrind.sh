#!/usr/bin/env bash
# Instructions per whole auth decision (key + step-up token through the real stack), counted by
# callgrind: deterministic, so two builds compare even on a noisy 2-core machine where
# criterion's nanoseconds drift by 30 % between runs. Prints the count and the top functions.
#
#   bench/callgrind.sh                   # needs valgrind (apt-get install valgrind)
#   bench/callgrind.sh "^auth decision"  # the auth decision alone (the stack from routing down)
#
# Valgrind hides SHA-NI from the program, so SHA-256 runs in software here and weighs more
# than it does for real; compare totals between builds, not with criterion's times.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
bin=$(cargo bench --bench auth --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="auth" and m.get("executable"): print(m["executable"])' | tail -1)
out=target/callgrind.auth.out  # kept for callgrind_annotate
BENCH_CONSUMERS=${BENCH_CONSUMERS:-1000} valgrind --tool=callgrind --callgrind-out-file="$out" \
  --toggle-collect='*auth::decide*' "$bin" --bench --profile-time 1 "${1:-whole}" >/dev/null 2>&1
# Decisions = calls of `decide`, summed over its callers (a callee's count can be a multiple:
# some are called twice per decision).
callgrind_annotate --tree=caller "$out" 2>/dev/null | python3 -c '
import re,sys
text=sys.stdin.read()
block=re.search(r"((?:^ *[0-9,]+ .*<.*\n)+)^ *[0-9,]+ .*\*  .*auth::decide", text, re.M)
calls=sum(int(n.replace(",","")) for n in re.findall(r"\(([0-9,]+)x\)", block.group(1)))
total=int(re.search(r"([0-9,]+) \(100.0%\)\s+PROGRAM TOTALS", text).group(1).replace(",",""))
print(f"decisions: {calls}  instructions per decision: {total//calls}")'
callgrind_annotate "$out" 2>/dev/null | sed -n '/file:function/,$p' | sed -n 3,25p | cut -c1-150

