#!/usr/bin/env bash
# One command from a fresh machine to a running demo: installs the dependencies, builds and
# installs pg_llm, starts a throwaway cluster and runs scripts/demo.sql against it.
# The cluster keeps running afterwards; stop it with `scripts/cluster.sh stop`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$REPO_ROOT/scripts/setup.sh"
"$REPO_ROOT/scripts/install_extension.sh"
"$REPO_ROOT/scripts/cluster.sh" start
BIN="$(pg_bindir)"
"$BIN/psql" "$(local_dsn)" -q -c "DROP DATABASE IF EXISTS pg_gpt3_demo" -c "CREATE DATABASE pg_gpt3_demo"
log "running the demo"
cd "$REPO_ROOT"
"$BIN/psql" "$(local_dsn pg_gpt3_demo)" -X -v ON_ERROR_STOP=1 -f "$REPO_ROOT/scripts/demo.sql"
log "done. Connect with: psql \"$(local_dsn pg_gpt3_demo)\"   Stop with: scripts/cluster.sh stop"
