# Shared settings and helpers for the pg_gpt3 scripts (sourced, not run).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

# The throwaway cluster: owned by the OS user postgres (the server refuses to run as root).
PG_GPT3_PORT="${PG_GPT3_PORT:-54329}"
PG_GPT3_RUN="${PG_GPT3_RUN:-/tmp/pg_gpt3_cluster}"
PG_GPT3_DATA="$PG_GPT3_RUN/data"
PG_GPT3_SOCK="$PG_GPT3_RUN/sock"
PG_GPT3_LOG="$PG_GPT3_RUN/server.log"
# Its HTTP endpoint (pg_llm's background workers, localhost only) and the database it serves.
# (Port 54380 beside the default 54329: a cluster on another port gets another HTTP port.)
PG_GPT3_HTTP_PORT="${PG_GPT3_HTTP_PORT:-$((PG_GPT3_PORT + 51))}"
PG_GPT3_HTTP_DATABASE="${PG_GPT3_HTTP_DATABASE:-postgres}"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

pg_bindir() { "$(command -v pg_config)" --bindir; }

# Runs a command as the postgres OS user when we are root; as ourselves otherwise.
as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The DSN of the throwaway cluster.
local_dsn() { echo "host=$PG_GPT3_SOCK port=$PG_GPT3_PORT user=postgres dbname=${1:-postgres}"; }
# The same cluster over TCP on localhost with TLS required (the client's TLS tests), and the
# CA certificate that signed its server certificate.
PG_GPT3_TLS="$PG_GPT3_RUN/tls"
tls_dsn() { echo "host=localhost port=$PG_GPT3_PORT user=postgres dbname=${1:-postgres} sslmode=require"; }
