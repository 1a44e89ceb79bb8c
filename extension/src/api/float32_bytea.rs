//! `Float32Bytea`: how every float32 tensor result leaves a SQL function, as `bytea`. The
//! values are copied once, straight into the result value; encoding to a `Vec<u8>` first would
//! copy large results such as logits twice and fault in an extra buffer of their size.

use pg_llm_engine::tensor;

/// A float32 tensor returned as `bytea`, copied once, straight into the result value (large
/// results such as logits would otherwise be copied twice).
pub struct Float32Bytea(pub Vec<f32>);

impl pgrx::IntoDatum for Float32Bytea {
    fn into_datum(self) -> Option<pgrx::pg_sys::Datum> {
        if cfg!(target_endian = "little") {
            // SAFETY: reading f32 values as bytes is always valid.
            let (_, bytes, _) = unsafe { self.0.align_to::<u8>() };
            bytes.into_datum()
        } else {
            tensor::encode(&self.0).into_datum()
        }
    }

    fn type_oid() -> pgrx::pg_sys::Oid {
        pgrx::pg_sys::BYTEAOID
    }
}

// SAFETY: the datum is returned to PostgreSQL as the function's result, as BoxRet requires.
unsafe impl pgrx::callconv::BoxRet for Float32Bytea {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        match pgrx::IntoDatum::into_datum(self) {
            // SAFETY: a freshly palloc'd bytea in the function's memory context.
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

pgrx::impl_sql_translatable!(Float32Bytea, "bytea");
