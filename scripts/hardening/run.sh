#!/usr/bin/env bash
# Runs the hardening measurements of issue 20 (see docs/operations.md), each printing a markdown
# table and a JSON line: cancel latency, weights under writes, and the 10-minute soak.
#   scripts/hardening/run.sh [cancel] [writes] [soak]      (default: all three, in that order)
# Without PG_GPT3_DSN each script starts and removes its own throwaway cluster; with it, that
# server (on this host) is used, in a database of the script's own. Exits non-zero when any
# script missed a target.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
declare -A script=([cancel]=cancel_latency.py [writes]=weights_under_writes.py [soak]=soak.py)
status=0
for name in "${@:-cancel writes soak}"; do
    for n in $name; do
        [ -n "${script[$n]:-}" ] || { echo "unknown measurement: $n (cancel, writes, soak)" >&2; exit 2; }
        python3 "$here/${script[$n]}" || status=1
    done
done
exit $status
