//! `Float32Bytea`: how every float32 tensor result leaves a SQL function, as `bytea`. Values
//! computed into a `Vec` are copied once, straight into the result value; large results such
//! as logits can instead be computed in the result value itself (`Float32Bytea::computed`),
//! so they are neither copied nor held twice.

use std::mem::MaybeUninit;

use pg_llm_engine::{parallel, tensor, Cancel, EngineError};
use pgrx::pg_sys;

/// A float32 tensor returned as `bytea`.
pub struct Float32Bytea(Repr);

enum Repr {
    Values(Vec<f32>),
    /// A finished bytea, palloc'd in the function's memory context.
    Bytea(pg_sys::Datum),
}

impl From<Vec<f32>> for Float32Bytea {
    fn from(values: Vec<f32>) -> Self {
        Self(Repr::Values(values))
    }
}

impl Float32Bytea {
    /// A result of `len` values that `compute` writes straight into the bytea's payload. The
    /// payload is zeroed first on the compute pool (cancellable: for 2048 tokens of logits it
    /// is 411 MB of fresh pages); an error leaves the memory to the memory context.
    pub fn computed(
        len: usize,
        cancel: Cancel,
        compute: impl FnOnce(&mut [f32]) -> pg_llm_engine::Result<()>,
    ) -> pg_llm_engine::Result<Self> {
        Self::in_payload(len, Some(cancel), compute)
    }

    /// `computed` for a `compute` whose result does not depend on what the payload held: a
    /// product that overwrites its destination (`matmul_into`, `linear_into`), which then
    /// writes each value once instead of after a zeroing pass (5 % of a 768³ product).
    pub fn overwritten(
        len: usize,
        compute: impl FnOnce(&mut [f32]) -> pg_llm_engine::Result<()>,
    ) -> pg_llm_engine::Result<Self> {
        Self::in_payload(len, None, compute)
    }

    /// The payload zeroed (cancellably) first when `zero_with` is given, left as palloc
    /// returned it otherwise.
    fn in_payload(
        len: usize,
        zero_with: Option<Cancel>,
        compute: impl FnOnce(&mut [f32]) -> pg_llm_engine::Result<()>,
    ) -> pg_llm_engine::Result<Self> {
        if len > tensor::MAX_TENSOR_ELEMS {
            return Err(EngineError::too_large(format!(
                "a result of {len} float32 values exceeds the 1 GB limit of one bytea"
            )));
        }
        if cfg!(target_endian = "big") {
            let mut values = tensor::alloc_zeroed(len)?;
            compute(&mut values)?;
            return Ok(Self::from(values));
        }
        let total = pg_sys::VARHDRSZ + 4 * len;
        // SAFETY: palloc returns a MAXALIGN'd block of `total` bytes (or raises an ERROR), so
        // the payload after the 4-byte header is 4-byte aligned room for `len` f32 values. It
        // is zeroed before `compute` sees it, or else handed over as the bytes palloc left
        // there (written by C, so some bit pattern, each a valid f32), which `overwritten`'s
        // callers never read before writing. The block lives in the current memory context,
        // which outlives this call, and nothing else refers to it.
        unsafe {
            let ptr = pg_sys::palloc(total) as *mut pg_sys::varlena;
            pgrx::set_varsize_4b(ptr, total as i32);
            let payload = (ptr as *mut u8).add(pg_sys::VARHDRSZ);
            let values = match zero_with {
                Some(cancel) => parallel::zeroed(
                    std::slice::from_raw_parts_mut(payload as *mut MaybeUninit<f32>, len),
                    cancel,
                )?,
                None => std::slice::from_raw_parts_mut(payload as *mut f32, len),
            };
            compute(values)?;
            Ok(Self(Repr::Bytea(pg_sys::Datum::from(ptr))))
        }
    }
}

impl pgrx::IntoDatum for Float32Bytea {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        match self.0 {
            Repr::Bytea(datum) => Some(datum),
            Repr::Values(values) => Some(bytea_in_blocks(&tensor::le_bytes(&values))),
        }
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::BYTEAOID
    }
}

/// Makes a type whose `into_datum` gives a palloc'd bytea usable as a function's result.
macro_rules! bytea_result {
    ($type:ty) => {
        // SAFETY: the datum is returned to PostgreSQL as the function's result, as BoxRet
        // requires.
        unsafe impl pgrx::callconv::BoxRet for $type {
            unsafe fn box_into<'fcx>(
                self,
                fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
            ) -> pgrx::datum::Datum<'fcx> {
                match pgrx::IntoDatum::into_datum(self) {
                    // SAFETY: a palloc'd bytea in the function's memory context.
                    Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
                    None => fcinfo.return_null(),
                }
            }
        }

        pgrx::impl_sql_translatable!($type, "bytea");
    };
}

bytea_result!(Float32Bytea);

/// Bytes returned as `bytea` (an export), copied into the SQL value like a tensor's.
pub struct Bytea(pub Vec<u8>);

impl pgrx::IntoDatum for Bytea {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(bytea_in_blocks(&self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::BYTEAOID
    }
}

bytea_result!(Bytea);

/// A palloc'd bytea holding `bytes`, copied in 16 MB blocks with a look for a cancel between
/// them: copying a result of hundreds of MB in one go would hold up a cancel.
fn bytea_in_blocks(bytes: &[u8]) -> pg_sys::Datum {
    const BLOCK: usize = 16 << 20;
    let total = pg_sys::VARHDRSZ + bytes.len();
    // SAFETY: palloc returns `total` bytes or raises an ERROR (a result over 1 GB included);
    // every payload byte is written below before the datum is handed to PostgreSQL.
    unsafe {
        let ptr = pg_sys::palloc(total) as *mut pg_sys::varlena;
        pgrx::set_varsize_4b(ptr, total as i32);
        let payload = (ptr as *mut u8).add(pg_sys::VARHDRSZ);
        for (k, block) in bytes.chunks(BLOCK).enumerate() {
            pgrx::check_for_interrupts!();
            std::ptr::copy_nonoverlapping(block.as_ptr(), payload.add(k * BLOCK), block.len());
        }
        pg_sys::Datum::from(ptr)
    }
}
