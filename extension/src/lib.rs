//! pg_llm: the PostgreSQL extension of pg_gpt3.
//!
//! A thin SQL layer: each `#[pg_extern]` translates SQL arguments into engine calls
//! (`pg_llm_engine`) and engine errors into SQL errors with their SQLSTATE. No arithmetic
//! happens here.

use pgrx::prelude::*;

mod api;
mod errors;
mod files;
mod flush;
mod guc;
mod model_cache;
mod store;
mod tokenizer_cache;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/types.sql", name = "types", bootstrap);
pgrx::extension_sql_file!("../sql/registry.sql", name = "registry");
pgrx::extension_sql_file!(
    "../sql/tokenizer.sql",
    name = "tokenizer",
    requires = ["registry"]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    // Model weights, KV caches and logits are large, short-lived buffers. A fixed mmap
    // threshold (glibc otherwise raises it after the first large free) hands them back to the
    // operating system when freed instead of keeping them in the backend's heap.
    // SAFETY: plain libc call, made once while the backend is single-threaded.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
