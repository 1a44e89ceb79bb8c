#!/usr/bin/env bash
# Builds the image pg-gpt3-demo (Dockerfile) and runs the demo in a container of it.
#   scripts/docker.sh [--keep]     --keep leaves the container running (name pg-gpt3-demo)
# Installs and starts Docker if needed (Debian's docker.io). The base image is debian:bookworm
# when a registry serves it; otherwise one is made here from Debian's packages with
# debootstrap (`pg-gpt3-base:bookworm`). The extension is packaged on this machine
# (`cargo pgrx package`) and copied in, so the image needs no Rust toolchain.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
keep=0
[ "${1:-}" = "--keep" ] && keep=1
sudo_=()
[ "$(id -u)" = 0 ] || sudo_=(sudo)

if ! command -v docker >/dev/null; then
    log "installing Docker (docker.io)"
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    ("${sudo_[@]}" dockerd >/tmp/pg_gpt3_dockerd.log 2>&1 &)
    for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null
fi

base=debian:bookworm
if ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull -q "$base" >/dev/null 2>&1; then
    base=pg-gpt3-base:bookworm
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        log "no registry: making $base with debootstrap"
        command -v debootstrap >/dev/null || "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
        mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
        root="$(mktemp -d)"
        "${sudo_[@]}" debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
        "${sudo_[@]}" tar -C "$root" -c . | docker import - "$base" >/dev/null
        "${sudo_[@]}" rm -rf "$root"
    fi
fi

"$REPO_ROOT/scripts/setup.sh"
log "packaging the extension (cargo pgrx package)"
(cd extension && cargo pgrx package --pg-config "$(command -v pg_config)" >/tmp/pg_gpt3_package.log 2>&1) \
    || { tail -n 40 /tmp/pg_gpt3_package.log >&2; exit 1; }
log "building pg-gpt3-demo from $base"
docker build -q -t pg-gpt3-demo --build-arg BASE="$base" . >/dev/null

docker rm -f pg-gpt3-demo >/dev/null 2>&1 || true
docker run -d --name pg-gpt3-demo pg-gpt3-demo >/dev/null
log "waiting for the first start (gpt3-125m is initialised inside)"
for _ in $(seq 1 120); do
    docker logs pg-gpt3-demo 2>&1 | grep -q "database system is ready to accept connections" \
        && docker exec pg-gpt3-demo su postgres -c "psql -X -q -d pg_gpt3 -c 'SELECT 1'" >/dev/null 2>&1 && break
    sleep 2
done
log "running the demo inside the container"
docker exec pg-gpt3-demo pg-gpt3-demo
ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' pg-gpt3-demo)"
if [ "$keep" = 1 ]; then
    log "container pg-gpt3-demo is running: psql \"host=$ip user=postgres password=pg_gpt3 dbname=pg_gpt3\""
else
    docker rm -f pg-gpt3-demo >/dev/null
    log "done (scripts/docker.sh --keep leaves the container running)"
fi
