#!/bin/sh
# The repository's demo (scripts/demo.sql) in a fresh database of the running container.
set -eu
cd /opt/pg_gpt3
su postgres -c "psql -X -q -c 'DROP DATABASE IF EXISTS pg_gpt3_demo' -c 'CREATE DATABASE pg_gpt3_demo'"
exec su postgres -c "psql -X -v ON_ERROR_STOP=1 -d pg_gpt3_demo -f scripts/demo.sql"
