//! pg_llm: the PostgreSQL extension of pg_gpt3.
//!
//! A thin SQL layer: each `#[pg_extern]` translates SQL arguments into engine calls
//! (`pg_llm_engine`) and engine errors into SQL errors with their SQLSTATE. No arithmetic
//! happens here.

use pgrx::prelude::*;

mod admission;
mod api;
mod dataset;
mod errors;
mod files;
mod flush;
mod guc;
mod large_objects;
mod model_cache;
mod privileges;
mod serve;
mod spi;
mod stats;
mod store;
mod tape;
mod tokenizer_cache;
mod training;
mod wait;
mod weight_cache;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/types.sql", name = "types", bootstrap);
pgrx::extension_sql_file!("../sql/registry.sql", name = "registry");
pgrx::extension_sql_file!(
    "../sql/cache.sql",
    name = "cache",
    requires = [pg_llm_weight_cache]
);
pgrx::extension_sql_file!(
    "../sql/training.sql",
    name = "training",
    requires = ["registry", llm_train_segment]
);
pgrx::extension_sql_file!(
    "../sql/tokenizer.sql",
    name = "tokenizer",
    requires = ["registry"]
);
pgrx::extension_sql_file!(
    "../sql/privileges.sql",
    name = "privileges",
    requires = ["training", "tokenizer"]
);
pgrx::extension_sql_file!(
    "../sql/sharing.sql",
    name = "sharing",
    requires = ["privileges"]
);
pgrx::extension_sql_file!(
    "../sql/relational.sql",
    name = "relational",
    requires = [
        "privileges",
        llm_param_tensor,
        llm_tape_records,
        llm_tape_tensors,
        pg_llm_linear,
        pg_llm_embedding,
        pg_llm_causal_attention
    ]
);
pgrx::extension_sql_file!(
    "../sql/serving.sql",
    name = "serving",
    requires = ["privileges", llm_stats, llm_metrics, llm_random_bytes]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    weight_cache::register_callbacks();
    // SAFETY: a flag PostgreSQL sets while the postmaster loads shared_preload_libraries.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        stats::register_shared_memory();
        serve::register();
    }
    // KV caches, logits and private weight copies are large buffers: a fixed mmap threshold
    // (glibc otherwise raises it after the first large free, up to any size) hands buffers
    // above 32 MB back to the operating system when freed. Activations below it are reused
    // from the heap, sparing every call the page faults of fresh mappings.
    // SAFETY: plain libc call, made once while the backend is single-threaded.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
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
