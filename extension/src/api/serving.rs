//! Serving as SQL: the metrics (the `llm_stats` view and the Prometheus text of
//! `llm_metrics()`, the same text the HTTP endpoint serves on /metrics; see stats.rs) and the
//! random bytes of API keys (serving.sql).

use pgrx::prelude::*;

use crate::errors::run;
use crate::{spi, stats};

/// Each model's current weight version, for the `weight_version` gauges.
pub(crate) fn weight_versions() -> pg_llm_engine::Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    spi::read(
        "SELECT model, version FROM llm_model_config ORDER BY model",
        &[],
        |row| {
            let model = row.get::<String>(1).map_err(crate::errors::spi_error)?;
            let version = row.get::<i64>(2).map_err(crate::errors::spi_error)?;
            if let (Some(m), Some(v)) = (model, version) {
                out.push((m, v));
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// Every metric as a row: name, Prometheus labels, value, and scope ('server' when pg_llm is
/// in shared_preload_libraries and the counts are the whole server's, 'backend' otherwise).
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_stats() -> TableIterator<
    'static,
    (
        name!(metric, String),
        name!(labels, String),
        name!(value, f64),
        name!(scope, String),
    ),
> {
    let samples = run("llm_stats", || Ok(stats::samples(&weight_versions()?)));
    let scope = if stats::is_shared() {
        "server"
    } else {
        "backend"
    };
    TableIterator::new(
        samples
            .into_iter()
            .map(move |s| (s.name, s.labels, s.value, scope.to_string()))
            .collect::<Vec<_>>(),
    )
}

/// The metrics in Prometheus' text exposition format.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_metrics() -> String {
    run("llm_metrics", || Ok(stats::prometheus(&weight_versions()?)))
}

/// `n` random bytes from PostgreSQL's strong random source (API keys).
#[pg_extern(volatile)]
fn llm_random_bytes(n: i32) -> Vec<u8> {
    run("llm_random_bytes", || {
        if !(1..=1024).contains(&n) {
            return Err(pg_llm_engine::EngineError::invalid(format!(
                "n must be between 1 and 1024, got {n}"
            )));
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: fills the buffer it is given.
        if !unsafe { pgrx::pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) } {
            return Err(pg_llm_engine::EngineError::Internal(
                "no strong random source".into(),
            ));
        }
        Ok(buf)
    })
}
