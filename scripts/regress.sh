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

tests=$(cd tests/sql && ls *.sql | sed 's/\.sql$//' | sort | tr '\n' ' ')
status=0
"$PG_REGRESS" --use-existing --host="$host" --port="$port" --user="$user" \
    --dbname=pg_llm_regress --load-extension=pg_llm \
    --inputdir=tests --expecteddir=expected --outputdir="$OUT" $tests || status=$?
if [ $status -ne 0 ] && [ -f "$OUT/regression.diffs" ]; then
    cat "$OUT/regression.diffs"
fi
[ $started = 1 ] && "$REPO_ROOT/scripts/cluster.sh" stop
n_total=$(echo $tests | wc -w)
n_failed=$(grep -c '^not ok\|\.\.\. FAILED\|failed (ignored)\|^     FAILED' "$OUT/regression.out" 2>/dev/null || true)
[ $status -ne 0 ] && [ "$n_failed" = 0 ] && n_failed=$n_total
echo "pg_regress: $((n_total - n_failed)) passed, $n_failed failed"
exit $status
