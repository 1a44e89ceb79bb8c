# pg-gpt3-demo: PostgreSQL 15 with the pg_llm extension, the GPT-2/3 tokenizer and the demo.
# `docker run` gives a server whose database pg_gpt3 has gpt3-125m initialised and the
# tokenizer loaded; `docker exec <container> pg-gpt3-demo` runs scripts/demo.sql inside.
#
# Build with scripts/docker.sh, which first packages the extension on the host
# (`cargo pgrx package`: target/release/pg_llm-pg15/). With a normal registry the base is
# debian:bookworm; without one, scripts/docker.sh makes an equivalent base with debootstrap
# and passes it as BASE.
ARG BASE=debian:bookworm
FROM ${BASE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*

# The extension as `cargo pgrx package` lays it out (.so, control file, install script).
COPY target/release/pg_llm-pg15/ /
# What the first start and the demo read: the real tokenizer and the demo's corpus.
COPY tests/fixtures/tokenizer/encoder.json tests/fixtures/tokenizer/vocab.bpe /opt/pg_gpt3/tests/fixtures/tokenizer/
COPY tests/fixtures/learning/corpus.txt /opt/pg_gpt3/tests/fixtures/learning/
COPY scripts/demo.sql /opt/pg_gpt3/scripts/demo.sql
COPY docker/entrypoint.sh /usr/local/bin/pg-gpt3-entrypoint
COPY docker/demo.sh /usr/local/bin/pg-gpt3-demo

ENV PGDATA=/var/lib/postgresql/data PG_GPT3_PASSWORD=pg_gpt3
VOLUME /var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["pg-gpt3-entrypoint"]
