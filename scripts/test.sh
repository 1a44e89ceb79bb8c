#!/usr/bin/env bash
# Runs every test of pg_gpt3, installing what it needs first:
#   1. engine unit tests, with finite-difference gradient checks (cargo test)
#   2. #[pg_test]s of the extension (cargo pgrx test, in pgrx's own throwaway cluster)
#   3. pg_regress: tests/sql/*.sql against expected/*.out
#   4. Rust client: unit tests and integration tests against the server
#   5. Python package: installed with pip (maturin), tested with pytest
#   6. notebooks: run headless (nbclient) at test size
# Steps 3-6 use the server in $PG_GPT3_DSN when set; otherwise a throwaway cluster that this
# script starts and stops.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/setup.sh"
failed=()

log "1/6 engine unit tests"
cargo test -p pg_llm_engine --release 2>&1 || failed+=("engine")

log "2/6 extension #[pg_test]s"
PGRX_TEST_DATA="/tmp/pg_gpt3_pgrx_test"
runas=()
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGRX_TEST_DATA" && chown postgres:postgres "$PGRX_TEST_DATA"
    runas=(--runas postgres --pgdata "$PGRX_TEST_DATA")
fi
(cd extension && cargo pgrx test pg15 "${runas[@]}" 2>&1) || failed+=("pg_test")

# The release build is installed after the pg_test build so the server runs it.
"$REPO_ROOT/scripts/install_extension.sh"
if [ -z "${PG_GPT3_DSN:-}" ]; then
    "$REPO_ROOT/scripts/cluster.sh" start
    trap '"$REPO_ROOT/scripts/cluster.sh" stop' EXIT
    "$(pg_bindir)/psql" "$(local_dsn)" -X -q -c "DROP DATABASE IF EXISTS pg_gpt3_test" -c "CREATE DATABASE pg_gpt3_test"
    export PG_GPT3_DSN="$(local_dsn pg_gpt3_test)"
    # The client's TLS test: the same database over TCP with TLS, and the CA to trust.
    export PG_GPT3_TLS_DSN="$(tls_dsn pg_gpt3_test)" PG_GPT3_TLS_ROOT="$PG_GPT3_TLS/root.crt"
fi
"$(pg_bindir)/psql" "$PG_GPT3_DSN" -X -q -c "CREATE EXTENSION IF NOT EXISTS pg_llm"

log "3/6 pg_regress"
"$REPO_ROOT/scripts/regress.sh" || failed+=("pg_regress")

log "4/6 Rust client"
cargo test -p pg_gpt3_client --release --all-features --no-fail-fast 2>&1 || failed+=("client")

log "5/6 Python package"
"$REPO_ROOT/scripts/python_tests.sh" || failed+=("python")

log "6/6 notebooks"
"$REPO_ROOT/scripts/notebook_tests.sh" || failed+=("notebooks")

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all test suites passed"
