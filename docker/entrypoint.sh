#!/bin/sh
# First start: a cluster in $PGDATA (password auth for TCP, user postgres, password
# $PG_GPT3_PASSWORD), a database pg_gpt3 with pg_llm, the tokenizer loaded for gpt3-125m and
# its 125 M parameters initialised. Every start: PostgreSQL in the foreground.
set -eu
BIN=/usr/lib/postgresql/15/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
    pwfile="$(mktemp)" && printf '%s\n' "$PG_GPT3_PASSWORD" > "$pwfile" && chown postgres "$pwfile"
    su postgres -c "$BIN/initdb -D $PGDATA -U postgres --pwfile=$pwfile --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8" >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    su postgres -c "$BIN/pg_ctl -D $PGDATA -o '-c listen_addresses=' -w start" >/dev/null
    cd /opt/pg_gpt3
    su postgres -c "psql -X -q -v ON_ERROR_STOP=1" <<'SQL'
CREATE DATABASE pg_gpt3;
\c pg_gpt3
CREATE EXTENSION pg_llm;
\set vocab `cat tests/fixtures/tokenizer/encoder.json`
\set merges `cat tests/fixtures/tokenizer/vocab.bpe`
SELECT llm_load_tokenizer('gpt3-125m', :'vocab', :'merges') AS vocabulary;
SELECT llm_init_params('gpt3-125m', 0) AS parameters;
SQL
    su postgres -c "$BIN/pg_ctl -D $PGDATA -m fast -w stop" >/dev/null
    echo "pg_gpt3: database pg_gpt3 ready (gpt3-125m initialised, tokenizer loaded)"
fi
exec su postgres -c "exec $BIN/postgres -D $PGDATA"
