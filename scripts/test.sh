#!/usr/bin/env bash
# Runs every test of pg_gpt3, installing what it needs first:
#   1. engine unit tests (cargo test)
#   2. #[pg_test]s of the extension (cargo pgrx test, in pgrx's own throwaway cluster)
#   3. pg_regress: tests/sql/*.sql against expected/*.out, on a throwaway cluster this script
#      starts and stops (or on the server in $PG_GPT3_DSN when that is set)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/setup.sh"
failed=()

log "1/3 engine unit tests"
cargo test -p pg_llm_engine --release 2>&1 || failed+=("engine")

log "2/3 extension #[pg_test]s"
PGRX_TEST_DATA="/tmp/pg_gpt3_pgrx_test"
mkdir -p "$PGRX_TEST_DATA"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$PGRX_TEST_DATA"
runas=()
[ "$(id -u)" = 0 ] && runas=(--runas postgres --pgdata "$PGRX_TEST_DATA")
(cd extension && cargo pgrx test pg15 "${runas[@]}" 2>&1) || failed+=("pg_test")

log "3/3 pg_regress"
# The release build is installed last so the demo and benchmarks run it.
"$REPO_ROOT/scripts/install_extension.sh"
"$REPO_ROOT/scripts/regress.sh" || failed+=("pg_regress")

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all test suites passed"
