//! Memory admission: a call that allocates in proportion to a model, a batch or an input
//! estimates its need first (`pg_llm_engine::memory`) and is refused with SQLSTATE 53200,
//! saying needed against allowed bytes, when the need exceeds `pg_llm.max_memory`. Refusing
//! up front is what keeps the server up: a backend that outgrows the machine is killed by
//! the kernel's OOM killer, and the postmaster then restarts every connection.
//!
//! The limit applies to each call on its own (like `work_mem`, not a budget shared by all
//! connections). A call's need counts the model's weights even when they are mapped from
//! the shared weight file: using a model needs them resident, so a model that cannot be held
//! within the limit cannot be created, imported or used.

use std::sync::OnceLock;

use pg_llm_engine::memory::{pretty, Need};
use pg_llm_engine::{EngineError, Result};

use crate::guc;

/// `pg_llm.max_memory` in bytes.
pub fn limit() -> u64 {
    match guc::MAX_MEMORY_MB.get() {
        mb if mb >= 0 => mb as u64 * (1 << 20),
        _ => server_memory() / 2,
    }
}

/// Refuses `what` when its need exceeds the limit.
pub fn admit(what: &str, need: Need) -> Result<()> {
    let limit = limit();
    if need.total() <= limit {
        return Ok(());
    }
    let parts = if need.weights > 0 && need.working > 0 {
        format!(
            " ({} of weights and {} of working memory)",
            pretty(need.weights),
            pretty(need.working)
        )
    } else {
        String::new()
    };
    Err(EngineError::OutOfMemory(format!(
        "{what} needs about {}{parts}, more than pg_llm.max_memory allows ({})",
        pretty(need.total()),
        pretty(limit)
    )))
}

/// The memory this server may use: the machine's physical memory, or a container's limit
/// (cgroup v2 `memory.max`) when that is lower.
fn server_memory() -> u64 {
    static MEMORY: OnceLock<u64> = OnceLock::new();
    *MEMORY.get_or_init(|| {
        // SAFETY: plain sysconf queries.
        let physical = unsafe {
            (libc::sysconf(libc::_SC_PHYS_PAGES).max(0) as u64)
                .saturating_mul(libc::sysconf(libc::_SC_PAGESIZE).max(0) as u64)
        };
        let container = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        container.map_or(physical, |c| c.min(physical))
    })
}
