#!/usr/bin/env bash
# Builds pg_llm in release mode and installs it into the system PostgreSQL.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT/extension"
log "building and installing the pg_llm extension (release)"
build_log="$(mktemp)"
if ! cargo pgrx install --release --pg-config "$(command -v pg_config)" >"$build_log" 2>&1; then
    tail -n 60 "$build_log" >&2
    exit 1
fi
rm -f "$build_log"
