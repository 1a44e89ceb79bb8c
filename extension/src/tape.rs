//! This session's autograd tape (`pg_llm_engine::tape`). While `pg_llm.autograd` is on, every
//! tensor kernel records its call here; `llm_backprop` replays the records backwards. The tape
//! is the session's own memory: concurrent sessions never see or clear each other's, and a
//! crash loses nothing that was stored (gradients a user keeps go to `llm_param.grad` through
//! `llm_accumulate_grads`). It is not transactional: a rollback does not remove records.

use std::cell::RefCell;

use pg_llm_engine::memory::Need;
use pg_llm_engine::tape::{Op, Source, Tape, TensorId};
use pg_llm_engine::{EngineError, Result};

use crate::{admission, guc};

thread_local! {
    static TAPE: RefCell<Tape> = RefCell::new(Tape::default());
}

/// Whether kernels record (`pg_llm.autograd`).
pub fn enabled() -> bool {
    guc::AUTOGRAD.get()
}

pub fn with<R>(f: impl FnOnce(&mut Tape) -> R) -> R {
    TAPE.with(|t| f(&mut t.borrow_mut()))
}

/// Refuses recording `adding` more bytes when the tape would outgrow `pg_llm.max_memory`,
/// and recording in a parallel worker (whose memory the session never sees).
fn admit(tape: &Tape, adding: usize) -> Result<()> {
    // SAFETY: reads a backend-global flag.
    if unsafe { pgrx::pg_sys::ParallelWorkerNumber } >= 0 {
        return Err(EngineError::NotReady(
            "pg_llm.autograd records in the session's own process, and this kernel ran in a \
             parallel worker: SET max_parallel_workers_per_gather = 0 while recording"
                .into(),
        ));
    }
    admission::admit(
        "the autograd tape (llm_tape_reset() empties it)",
        Need {
            weights: 0,
            working: (tape.bytes() + adding) as u64,
        },
    )
}

/// Records a kernel call when autograd mode is on.
pub fn record(op: Op, inputs: &[&[f32]], output: &[f32], shape: Vec<usize>) -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    with(|tape| {
        let adding = inputs.iter().map(|x| x.len()).sum::<usize>() + output.len();
        admit(tape, adding * 4)?;
        tape.record(op, inputs, output.to_vec(), shape);
        Ok(())
    })
}

/// Records a parameter or a watched input when autograd mode is on.
pub fn leaf(data: &[f32], shape: Vec<usize>, source: Source) -> Result<Option<TensorId>> {
    if !enabled() {
        return Ok(None);
    }
    with(|tape| {
        admit(tape, data.len() * 4)?;
        Ok(Some(tape.leaf(data.to_vec(), shape, source)))
    })
}

/// Admits the gradients a backward pass will add.
pub fn admit_backward(tape: &Tape) -> Result<()> {
    admit(tape, tape.backward_bytes())
}
