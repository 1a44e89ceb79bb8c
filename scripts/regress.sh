#!/usr/bin/env bash
# pg_regress over tests/sql → expected/. Uses the server in $PG_GPT3_DSN when set (the role
# needs CREATEDB), otherwise starts the throwaway cluster and stops it afterwards.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

BIN="$(pg_bindir)"
PG_REGRESS="$("$(command -v pg_config)" --pkglibdir)/pgxs/src/test/regress/pg_regress"
OUT="$(mktemp -d /tmp/pg_gpt3_regress.XXXXXX)"
chmod 777 "$OUT"

started=0
if [ -n "${PG_GPT3_DSN:-}" ]; then
    # Ask the server where it listens: its socket directory or address, port and our role.
    read -r host port user < <("$BIN/psql" "$PG_GPT3_DSN" -XAt -F ' ' -c \
        "SELECT coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
                current_setting('port'), current_user")
else
    "$REPO_ROOT/scripts/cluster.sh" start
    started=1
    host="$PG_GPT3_SOCK"; port="$PG_GPT3_PORT"; user=postgres
fi

# PostgreSQL 15's pg_regress has no --expecteddir: it reads INPUTDIR/sql and INPUTDIR/expected,
# so give it an input directory that links to tests/sql and the top-level expected/.
mkdir -p "$OUT/input"
ln -s "$REPO_ROOT/tests/sql" "$OUT/input/sql"
ln -s "$REPO_ROOT/expected" "$OUT/input/expected"
# Fixtures are read by psql on the client side (PG_ABS_SRCDIR), so any server works.
ln -s "$REPO_ROOT/tests/fixtures" "$OUT/input/fixtures"

# With --use-existing pg_regress neither creates the database nor loads the extension.
DB=pg_llm_regress
"$BIN/psql" -X -q -h "$host" -p "$port" -U "$user" -d postgres \
    -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
"$BIN/psql" -X -q -h "$host" -p "$port" -U "$user" -d "$DB" -c "CREATE EXTENSION pg_llm"

tests=$(cd tests/sql && ls *.sql | sed 's/\.sql$//' | sort | tr '\n' ' ')
status=0
set +o pipefail
"$PG_REGRESS" --use-existing --host="$host" --port="$port" --user="$user" \
    --dbname="$DB" \
    --inputdir="$OUT/input" --outputdir="$OUT" $tests 2>&1 | tee "$OUT/summary.txt"
status=${PIPESTATUS[0]}
set -o pipefail
if [ $status -ne 0 ] && [ -f "$OUT/regression.diffs" ]; then
    cat "$OUT/regression.diffs"
    echo "actual outputs are in $OUT/results"
fi
[ $started = 1 ] && "$REPO_ROOT/scripts/cluster.sh" stop
n_total=$(echo $tests | wc -w)
n_passed=$(grep -cE '^(test| ) *[a-z_0-9]+ +\.\.\. ok' "$OUT/summary.txt" || true)
echo "pg_regress: $n_passed passed, $((n_total - n_passed)) failed"
[ "$n_passed" = "$n_total" ] || status=1
exit $status
