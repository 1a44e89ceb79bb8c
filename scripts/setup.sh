#!/usr/bin/env bash
# Installs everything pg_gpt3 needs to build and test, idempotently: Debian packages,
# cargo-pgrx 0.18.0 registered against the system PostgreSQL. Quick when already done.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo pkg-config)
PGRX_VERSION=0.18.0

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    # Installing the dev package can upgrade the server: restart a running cluster.
    if [ -f "$PG_GPT3_DATA/postmaster.pid" ]; then
        "$REPO_ROOT/scripts/cluster.sh" stop || true
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "cargo (Rust) is required: install it with rustup first" >&2
    exit 1
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    log "installing cargo-pgrx $PGRX_VERSION (takes a few minutes once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

PG_CONFIG="$(command -v pg_config)"
if ! grep -q "pg15 *= *\"$PG_CONFIG\"" "$HOME/.pgrx/config.toml" 2>/dev/null; then
    log "registering $PG_CONFIG with pgrx"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi
