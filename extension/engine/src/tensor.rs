//! Float32 tensors as they cross the SQL boundary: little-endian bytes, row-major, with the
//! dimensions given separately. Everything here validates before it allocates, so a malformed
//! call becomes an error rather than an abort.

use std::borrow::Cow;

use crate::error::{EngineError, Result};

/// Largest value PostgreSQL can allocate in one piece (MaxAllocSize, 1 GB - 1).
pub const MAX_ALLOC_BYTES: usize = 0x3fff_ffff;
/// Largest float32 payload one `bytea` can carry (MaxAllocSize minus the 4-byte varlena header).
pub const MAX_TENSOR_BYTES: usize = MAX_ALLOC_BYTES - 4;
/// Largest number of float32 values in one SQL tensor.
pub const MAX_TENSOR_ELEMS: usize = MAX_TENSOR_BYTES / 4;

/// Which non-finite values an input may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finite {
    /// NaN and ±infinity are rejected (weights, activations, gradients).
    Required,
    /// −infinity is accepted as a mask value (logits); NaN and +infinity are rejected.
    AllowNegInf,
    /// Not checked here: the operands of a product, checked through its result
    /// (`blame_operands`).
    ThroughProduct,
}

/// Decodes a little-endian float32 blob, rejecting a byte length that is not a multiple of 4
/// and non-finite values according to `finite`. `arg` names the SQL argument in messages.
pub fn decode(bytes: &[u8], arg: &str, finite: Finite) -> Result<Vec<f32>> {
    view(bytes, arg, finite).map(Cow::into_owned)
}

/// Like `decode`, without a copy where it can: on a little-endian machine, bytes that start on
/// a 4-byte boundary are viewed in place as float32 values; others are decoded into a new
/// buffer. The same checks, in the same order, with the same errors as `decode`.
pub fn view<'a>(bytes: &'a [u8], arg: &str, finite: Finite) -> Result<Cow<'a, [f32]>> {
    // SAFETY: every bit pattern is a valid f32; align_to only reinterprets.
    let (head, floats, tail) = unsafe { bytes.align_to::<f32>() };
    let values = if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
        Cow::Borrowed(floats)
    } else {
        Cow::Owned(decode_any(bytes, arg)?)
    };
    check_finite(&values, arg, finite)?;
    Ok(values)
}

/// Decodes faithfully, NaN and infinities included; only the byte length is checked.
pub fn decode_any(bytes: &[u8], arg: &str) -> Result<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        return Err(EngineError::data(format!(
            "{arg} is not a float32 tensor: its length {} bytes is not a multiple of 4",
            bytes.len()
        )));
    }
    let mut out = alloc_zeroed(bytes.len() / 4)?;
    copy_decoded(&mut out, bytes, arg)?;
    Ok(out)
}

/// Decodes `bytes` into the start of `out`, returning the number of values written; an error
/// when the byte length is not a multiple of 4 or the values do not fit.
pub fn copy_decoded(out: &mut [f32], bytes: &[u8], arg: &str) -> Result<usize> {
    let n = bytes.len() / 4;
    if bytes.len() % 4 != 0 || n > out.len() {
        return Err(EngineError::data(format!(
            "{arg}: {} bytes do not fit {} float32 values",
            bytes.len(),
            out.len()
        )));
    }
    // SAFETY: every bit pattern is a valid f32; align_to only reinterprets.
    let (head, floats, tail) = unsafe { bytes.align_to::<f32>() };
    if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
        out[..n].copy_from_slice(floats);
    } else {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(n)
}

/// Decodes `bytes` and checks that it holds exactly `numel` values; `shape` describes the
/// expected shape for the message (for example "[m=2, k=3]").
pub fn decode_exact(
    bytes: &[u8],
    arg: &str,
    numel: usize,
    shape: &str,
    finite: Finite,
) -> Result<Vec<f32>> {
    view_exact(bytes, arg, numel, shape, finite).map(Cow::into_owned)
}

/// `decode_exact` without a copy where it can (see `view`).
pub fn view_exact<'a>(
    bytes: &'a [u8],
    arg: &str,
    numel: usize,
    shape: &str,
    finite: Finite,
) -> Result<Cow<'a, [f32]>> {
    if bytes.len() != numel.saturating_mul(4) {
        return Err(EngineError::invalid(format!(
            "{arg} has {} bytes but shape {shape} needs {numel} float32 values ({} bytes)",
            bytes.len(),
            numel.saturating_mul(4)
        )));
    }
    view(bytes, arg, finite)
}

/// Encodes values as little-endian float32 bytes.
pub fn encode(values: &[f32]) -> Vec<u8> {
    le_bytes(values).into_owned()
}

/// The little-endian bytes of float32 values, borrowed where the machine is little-endian:
/// writing a 150 MB tensor into a row then copies it once (into the datum), not twice.
pub fn le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: reading f32 values as bytes is always valid.
        let (_, bytes, _) = unsafe { values.align_to::<u8>() };
        return Cow::Borrowed(bytes);
    }
    Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Checks that no value is NaN or an infinity the policy forbids; names the first bad index.
pub fn check_finite(values: &[f32], arg: &str, finite: Finite) -> Result<()> {
    let bad = match finite {
        Finite::Required => first_bad(values, |bits| bits & !SIGN, EXPONENT - 1),
        // NaN (any payload, either sign) or +infinity, but not −infinity (a mask): a negative
        // value's magnitude is bad above EXPONENT, a positive one's from EXPONENT on.
        Finite::AllowNegInf => {
            first_bad(values, |bits| (bits & !SIGN) + (1 - (bits >> 31)), EXPONENT)
        }
        Finite::ThroughProduct => None,
    };
    match bad {
        None => Ok(()),
        Some(i) => Err(EngineError::data(format!(
            "{arg} contains a non-finite value ({}) at index {i}",
            values[i]
        ))),
    }
}

/// Checks a computed result for overflow (a finite input can still overflow float32).
pub fn check_result(values: &[f32], what: &str) -> Result<()> {
    match first_bad(values, |bits| bits & !SIGN, EXPONENT - 1) {
        None => Ok(()),
        Some(i) => Err(EngineError::OutOfRange(format!(
            "{what} overflowed float32 range at index {i} ({})",
            values[i]
        ))),
    }
}

/// The outcome of a product whose operands were viewed with `Finite::ThroughProduct`, with a
/// non-finite result traced back to its operands. Every term of a product is computed, and
/// NaN·x, ±∞·0 and ±∞·x are all non-finite, so a non-finite operand value makes its whole row
/// (of the left operand) or column (of the right one, or of a bias) of the result non-finite:
/// a finite result proves finite operands, which are then never read a second time (for a
/// decode-shaped product that halves the memory traffic). Only a result that failed its
/// overflow check (`OutOfRange`) has them scanned, and the first non-finite operand is reported
/// as `check_finite` reports it, so callers see the same error as with operands checked
/// beforehand; finite operands leave the overflow error. An empty result (`result_len` 0)
/// proves nothing, so then the operands are always scanned.
pub fn blame_operands<T>(
    outcome: Result<T>,
    result_len: usize,
    operands: &[(&[f32], &str)],
) -> Result<T> {
    if result_len == 0 || matches!(outcome, Err(EngineError::OutOfRange(_))) {
        for (values, arg) in operands {
            check_finite(values, arg, Finite::Required)?;
        }
    }
    outcome
}

const SIGN: u32 = 0x8000_0000;
/// The magnitude bits of +infinity; any magnitude above is a NaN.
const EXPONENT: u32 = 0x7f80_0000;

/// The index of the first value whose `key` (of its bits) exceeds `limit`. Every check of a
/// kernel's operands and result goes through here, so blocks are scanned for their largest
/// key, a reduction the compiler vectorises, on the compute pool for large tensors; only a
/// block with a bad value is searched element by element.
fn first_bad(values: &[f32], key: impl Fn(u32) -> u32 + Sync, limit: u32) -> Option<usize> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let bad = |v: &f32| key(v.to_bits()) > limit;
    let any_bad = |block: &[f32]| crate::simd::max_key(block, &key) > limit;
    let block = if values.len() <= BLOCK {
        any_bad(values).then_some(0)
    } else {
        crate::parallel::install(|| values.par_chunks(BLOCK).position_first(any_bad))
    }?;
    let start = block * BLOCK;
    values[start..].iter().position(bad).map(|i| start + i)
}

/// Validates one dimension given by the caller: strictly positive and not absurd.
pub fn dim(value: i64, name: &str) -> Result<usize> {
    if value <= 0 {
        return Err(EngineError::invalid(format!(
            "{name} must be positive, got {value}"
        )));
    }
    if value as u64 > MAX_TENSOR_ELEMS as u64 {
        return Err(EngineError::too_large(format!(
            "{name} = {value} exceeds the largest tensor dimension ({MAX_TENSOR_ELEMS})"
        )));
    }
    Ok(value as usize)
}

/// Number of elements of a shape, overflow-checked and limited to what one bytea can hold.
/// `what` names the tensor in the message.
pub fn numel(dims: &[usize], what: &str) -> Result<usize> {
    let mut n: u64 = 1;
    for &d in dims {
        n = n.saturating_mul(d as u64);
    }
    if n > MAX_TENSOR_ELEMS as u64 {
        return Err(EngineError::too_large(format!(
            "{what} would have {} elements {}; one tensor holds at most {MAX_TENSOR_ELEMS} (1 GB)",
            if n == u64::MAX {
                "more than 2^64".to_string()
            } else {
                n.to_string()
            },
            shape_str(dims)
        )));
    }
    Ok(n as usize)
}

/// A shape written as `[a, b, c]` for messages.
pub fn shape_str(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Allocates a zeroed buffer, returning an error instead of aborting when memory is short.
/// Through `calloc`: a large buffer comes as fresh zero pages, so the values are not written
/// twice (zeroes, then the caller's) as a resized Vec would.
pub fn alloc_zeroed(n: usize) -> Result<Vec<f32>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n)
        .map_err(|_| EngineError::too_large(format!("cannot allocate {n} float32 values")))?;
    // SAFETY: the layout has a non-zero size; all-zero bits are the float32 value 0.0; the
    // Vec owns the block with exactly the layout it was allocated with (global allocator).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut f32;
        if ptr.is_null() {
            return Err(EngineError::OutOfMemory(format!(
                "out of memory allocating {n} float32 values"
            )));
        }
        Ok(Vec::from_raw_parts(ptr, n, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = vec![1.0f32, -2.5, 3.25e-8, f32::MAX];
        assert_eq!(decode(&encode(&v), "x", Finite::Required).unwrap(), v);
    }

    #[test]
    fn rejects_ragged_length_and_nan() {
        assert!(matches!(
            decode(&[0u8; 5], "x", Finite::Required),
            Err(EngineError::Data(_))
        ));
        let nan = encode(&[1.0, f32::NAN]);
        let err = decode(&nan, "logits", Finite::AllowNegInf).unwrap_err();
        assert!(err
            .to_string()
            .contains("logits contains a non-finite value (NaN) at index 1"));
        let masked = encode(&[1.0, f32::NEG_INFINITY]);
        assert!(decode(&masked, "logits", Finite::AllowNegInf).is_ok());
        assert!(decode(&masked, "x", Finite::Required).is_err());
    }

    #[test]
    fn view_borrows_aligned_bytes_and_copies_others() {
        // The same bytes at a 4-byte aligned address and one byte past it.
        let at = |bytes: &[u8], shift: usize| {
            let mut buf = vec![0u8; bytes.len() + 8];
            let start = buf.as_ptr().align_offset(4) + shift;
            buf[start..start + bytes.len()].copy_from_slice(bytes);
            (buf, start)
        };
        let v: Vec<f32> = (0..9).map(|i| i as f32 * 0.37 - 1.0).collect();
        let bytes = encode(&v);
        let (buf, start) = at(&bytes, 0);
        let aligned = view(&buf[start..start + bytes.len()], "x", Finite::Required).unwrap();
        assert!(matches!(aligned, Cow::Borrowed(_)) || cfg!(target_endian = "big"));
        let (buf1, start1) = at(&bytes, 1);
        let unaligned = view(&buf1[start1..start1 + bytes.len()], "x", Finite::Required).unwrap();
        assert!(matches!(unaligned, Cow::Owned(_)));
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&aligned), bits(&v));
        assert_eq!(bits(&unaligned), bits(&v));
        // The same errors either way.
        let nan = encode(&[1.0, f32::NAN, 2.0]);
        for shift in [0, 1] {
            let (buf, start) = at(&nan, shift);
            let err = view(&buf[start..start + nan.len()], "a", Finite::Required).unwrap_err();
            assert_eq!(err.sqlstate(), "22000");
            assert!(err
                .to_string()
                .contains("a contains a non-finite value (NaN) at index 1"));
        }
    }

    #[test]
    fn checks_find_the_first_bad_value_in_any_block() {
        let mut v = vec![1.5f32; 300_000];
        assert!(check_finite(&v, "x", Finite::Required).is_ok());
        assert!(check_result(&v, "y").is_ok());
        v[250_000] = f32::NEG_INFINITY;
        assert!(check_finite(&v, "x", Finite::AllowNegInf).is_ok());
        let err = check_finite(&v, "x", Finite::Required).unwrap_err();
        assert!(err.to_string().contains("(-inf) at index 250000"), "{err}");
        v[70_001] = -f32::NAN;
        let err = check_finite(&v, "x", Finite::AllowNegInf).unwrap_err();
        assert!(err.to_string().contains("(NaN) at index 70001"), "{err}");
        v[3] = f32::INFINITY;
        let err = check_finite(&v, "x", Finite::AllowNegInf).unwrap_err();
        assert!(err.to_string().contains("(inf) at index 3"), "{err}");
        let err = check_result(&v, "y").unwrap_err();
        assert_eq!(err.sqlstate(), "22003");
        assert!(err
            .to_string()
            .contains("y overflowed float32 range at index 3"));
    }

    #[test]
    fn numel_is_overflow_safe() {
        assert_eq!(numel(&[2, 3, 4], "t").unwrap(), 24);
        assert!(matches!(
            numel(&[1 << 40, 1 << 40], "t"),
            Err(EngineError::TooLarge(_))
        ));
        assert!(matches!(
            numel(&[usize::MAX, usize::MAX], "t"),
            Err(EngineError::TooLarge(_))
        ));
        assert!(matches!(dim(0, "m"), Err(EngineError::InvalidParameter(_))));
        assert!(matches!(
            dim(-3, "m"),
            Err(EngineError::InvalidParameter(_))
        ));
    }

    #[test]
    fn exact_length_is_checked() {
        let b = encode(&[1.0, 2.0, 3.0]);
        let err = decode_exact(&b, "a", 4, "[m=2, k=2]", Finite::Required).unwrap_err();
        assert_eq!(err.sqlstate(), "22023");
        assert!(err
            .to_string()
            .contains("a has 12 bytes but shape [m=2, k=2] needs 4"));
    }
}
