//! What the caches hold, as SQL: this connection's loaded models and the shared weight files.

use pgrx::prelude::*;

use crate::{model_cache, weight_cache};

/// The models this connection holds in memory: the version of their weights, whether the
/// weights are mapped from a shared weight file, and their size in bytes.
#[pg_extern(volatile, parallel_restricted)]
fn llm_loaded_models() -> TableIterator<
    'static,
    (
        name!(model, String),
        name!(version, i64),
        name!(weight_file, bool),
        name!(bytes, i64),
    ),
> {
    TableIterator::new(model_cache::loaded())
}

/// The weight files of every database (the `llm_weight_cache` view): the model and version a
/// file holds, its size, when it was last opened, and its state ("ready"; "writing" while a
/// connection writes it; "abandoned" when its writer died, until the next sweep removes it).
#[pg_extern(volatile, parallel_restricted)]
fn pg_llm_weight_cache() -> TableIterator<
    'static,
    (
        name!(database, pg_sys::Oid),
        name!(model, Option<String>),
        name!(version, Option<i64>),
        name!(bytes, i64),
        name!(last_used, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(state, String),
        name!(file, String),
    ),
> {
    let rows = weight_cache::entries().into_iter().map(|e| {
        let last_used = e
            .last_used
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| pgrx::datum::TimestampWithTimeZone::try_from(pg_unix_time(d)).ok());
        (
            pg_sys::Oid::from(e.database),
            e.model,
            e.version,
            e.bytes as i64,
            last_used,
            e.state.name().to_string(),
            e.path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        )
    });
    TableIterator::new(rows.collect::<Vec<_>>())
}

/// Microseconds since PostgreSQL's epoch (2000-01-01) for a time since the Unix epoch.
fn pg_unix_time(since_unix: std::time::Duration) -> i64 {
    const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
    since_unix.as_micros() as i64 - PG_EPOCH_OFFSET_US
}
