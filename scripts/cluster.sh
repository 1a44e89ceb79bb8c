#!/usr/bin/env bash
# A throwaway local PostgreSQL cluster for the demo and the tests.
#   scripts/cluster.sh start | stop | status | psql [args]
# Runs as the OS user postgres on a unix socket under $PG_GPT3_RUN, port $PG_GPT3_PORT, with
# pg_llm preloaded (shared metrics) and its HTTP endpoint on 127.0.0.1:$PG_GPT3_HTTP_PORT
# serving database $PG_GPT3_HTTP_DATABASE.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BIN="$(pg_bindir)"

# A test CA and a localhost server certificate it signed, made once per cluster, so that the
# cluster also serves TLS on 127.0.0.1 (PostgreSQL does not use TLS on unix sockets).
tls_files() {
    [ -f "$PG_GPT3_TLS/server.key" ] && return 0
    local dir="$PG_GPT3_TLS"
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=pg_gpt3 test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
        -keyout "$dir/ca.key" -out "$dir/root.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
        "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" > "$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/root.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 3650 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
    chmod 600 "$dir/server.key" "$dir/ca.key"
    if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$dir"; fi
}

start() {
    if [ -f "$PG_GPT3_DATA/postmaster.pid" ] && as_postgres "$BIN/pg_ctl" -D "$PG_GPT3_DATA" status >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$PG_GPT3_RUN"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PG_GPT3_RUN"; fi
    if [ ! -f "$PG_GPT3_DATA/PG_VERSION" ]; then
        as_postgres "$BIN/initdb" -D "$PG_GPT3_DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    fi
    as_postgres mkdir -p "$PG_GPT3_SOCK"
    tls_files
    # RUST_BACKTRACE would make pgrx append Rust backtraces to error details.
    as_postgres env -u RUST_BACKTRACE "$BIN/pg_ctl" -D "$PG_GPT3_DATA" -l "$PG_GPT3_LOG" -w -t 60 \
        -o "-p $PG_GPT3_PORT -k $PG_GPT3_SOCK -c listen_addresses=127.0.0.1 -c shared_buffers=256MB \
            -c ssl=on -c ssl_cert_file=$PG_GPT3_TLS/server.crt -c ssl_key_file=$PG_GPT3_TLS/server.key \
            -c shared_preload_libraries=pg_llm -c pg_llm.http_enabled=on \
            -c pg_llm.http_port=$PG_GPT3_HTTP_PORT -c pg_llm.http_database=$PG_GPT3_HTTP_DATABASE" start >/dev/null
    log "PostgreSQL running: psql \"$(local_dsn)\"; HTTP endpoint http://127.0.0.1:$PG_GPT3_HTTP_PORT (database $PG_GPT3_HTTP_DATABASE)"
}

stop() {
    if [ -f "$PG_GPT3_DATA/postmaster.pid" ]; then
        as_postgres "$BIN/pg_ctl" -D "$PG_GPT3_DATA" -m fast -w stop >/dev/null || true
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    destroy) stop; rm -rf "$PG_GPT3_RUN" ;;
    status) as_postgres "$BIN/pg_ctl" -D "$PG_GPT3_DATA" status ;;
    psql) shift; exec "$BIN/psql" "$(local_dsn)" "$@" ;;
    *) echo "usage: $0 start|stop|destroy|status|psql [args]" >&2; exit 2 ;;
esac
