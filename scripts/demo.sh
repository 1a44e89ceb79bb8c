#!/usr/bin/env bash
# One command from a fresh machine to a running demo: installs the dependencies, builds and
# installs pg_llm, starts a throwaway cluster, runs scripts/demo.sql against it, then asks
# the cluster's HTTP endpoint for completions with curl.
# The cluster keeps running afterwards; stop it with `scripts/cluster.sh stop`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$REPO_ROOT/scripts/setup.sh"
"$REPO_ROOT/scripts/install_extension.sh"
# (Re)started so that its HTTP endpoint serves the demo's database.
export PG_GPT3_HTTP_DATABASE=pg_gpt3_demo
"$REPO_ROOT/scripts/cluster.sh" stop
"$REPO_ROOT/scripts/cluster.sh" start
BIN="$(pg_bindir)"
# FORCE: the HTTP worker serving the demo database is connected to it.
"$BIN/psql" "$(local_dsn)" -q -c "DROP DATABASE IF EXISTS pg_gpt3_demo WITH (FORCE)" -c "CREATE DATABASE pg_gpt3_demo"
log "running the demo"
cd "$REPO_ROOT"
"$BIN/psql" "$(local_dsn pg_gpt3_demo)" -X -v ON_ERROR_STOP=1 -f "$REPO_ROOT/scripts/demo.sql"
log "the HTTP endpoint: OpenAI-compatible completions from the model just trained"
URL="http://127.0.0.1:$PG_GPT3_HTTP_PORT"
for _ in $(seq 1 100); do
    curl -sf "$URL/health" >/dev/null && break
    sleep 0.1
done
KEY="$("$BIN/psql" "$(local_dsn pg_gpt3_demo)" -X -A -t -q -c "SELECT llm_create_api_key('postgres', 'demo')")"
set -x
# The SQL demo's sampled continuation again (same settings and seed, so the same text).
curl -sS "$URL/v1/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d '{"model": "demo-tiny", "prompt": "The library", "max_tokens": 16, "temperature": 0.7,
         "top_k": 20, "top_p": 0.95, "seed": 3}'
echo
curl -sS -N "$URL/v1/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d '{"model": "demo-tiny", "prompt": "The library", "max_tokens": 4, "temperature": 0, "stream": true}'
curl -sS "$URL/metrics" | grep -E '^pg_llm_(requests_total|generated_tokens_total|time_to_first_token_seconds_sum)'
set +x
log "done. Connect with: psql \"$(local_dsn pg_gpt3_demo)\"   Stop with: scripts/cluster.sh stop"
