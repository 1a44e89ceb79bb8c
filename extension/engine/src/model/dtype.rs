//! The precision a model's weights are served in, and the layout of a weight image that holds
//! its matrices in half precision.
//!
//! A half-precision model keeps every matrix (the 2-D tensors: embeddings, projections, the
//! head) in bfloat16 or float16 and every vector (LayerNorm gains and biases, biases) in
//! float32; kernels widen the halves to float32 and accumulate in float32. The float32 master
//! values stay in the tables: serving in half precision rounds them when the image is written.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::weights::packing;
use crate::error::{EngineError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    Float32,
    Bfloat16,
    Float16,
}

impl DType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float32" | "fp32" | "f32" => Ok(Self::Float32),
            "bfloat16" | "bf16" => Ok(Self::Bfloat16),
            "float16" | "fp16" | "f16" => Ok(Self::Float16),
            other => Err(EngineError::invalid(format!(
                "unknown weight dtype \"{other}\" (float32, bfloat16 or float16)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
            Self::Float16 => "float16",
        }
    }

    /// The half-precision kind of the matrices, None for float32.
    pub fn half(self) -> Option<Half> {
        match self {
            Self::Float32 => None,
            Self::Bfloat16 => Some(Half::Bf16),
            Self::Float16 => Some(Half::F16),
        }
    }

    /// Bytes of one value in this dtype.
    pub fn value_bytes(self) -> usize {
        match self {
            Self::Float32 => 4,
            Self::Bfloat16 | Self::Float16 => 2,
        }
    }

    /// `v` rounded to the nearest value this dtype holds (round to nearest even), as float32.
    /// A finite float32 beyond float16's range becomes an infinity: `round_checked` refuses it.
    pub fn round(self, v: f32) -> f32 {
        match self.half() {
            None => v,
            Some(h) => h.widen(h.narrow(v)),
        }
    }

    /// Rounds every value of `values` in place, as `round` does, on the compute pool when
    /// there are many.
    pub fn round_slice(self, values: &mut [f32]) {
        if let Some(h) = self.half() {
            crate::parallel::for_rows(values, 1, |_, block| h.round_block(block));
        }
    }

    /// `round_slice`; a value that is finite in float32 but not in this dtype (float16 beyond
    /// ±65504) is `OutOfRange`, naming `what`, and leaves `values` partly rounded.
    pub fn round_checked(self, values: &mut [f32], what: &str) -> Result<()> {
        let Some(h) = self.half() else {
            return Ok(());
        };
        // Each block counts its finite values before and after rounding, while it is in cache.
        let overflowed = std::sync::atomic::AtomicBool::new(false);
        crate::parallel::for_rows(values, 1, |_, block| {
            let finite = |b: &[f32]| b.iter().filter(|v| v.is_finite()).count();
            let before = finite(block);
            h.round_block(block);
            if finite(block) != before {
                overflowed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        if !overflowed.into_inner() {
            return Ok(());
        }
        let i = values.iter().position(|v| v.is_infinite()).unwrap_or(0);
        Err(EngineError::OutOfRange(format!(
            "{what}[{i}] does not fit in {}",
            self.name()
        )))
    }
}

/// A 16-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    /// The bits of `v` rounded to this format (nearest, ties to even).
    #[inline]
    pub fn narrow(self, v: f32) -> u16 {
        match self {
            Half::Bf16 => half::bf16::from_f32(v).to_bits(),
            Half::F16 => half::f16::from_f32(v).to_bits(),
        }
    }

    /// The float32 value of `bits` (exact).
    #[inline]
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            Half::Bf16 => f32::from_bits((bits as u32) << 16),
            Half::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }

    /// `narrow` of each value of `values` into `bits` (the common length).
    pub fn narrow_into(self, values: &[f32], bits: &mut [u16]) {
        match self {
            Half::Bf16 => bits
                .iter_mut()
                .zip(values)
                .for_each(|(b, &v)| *b = bf16_bits(v)),
            Half::F16 => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let n = bits.len().min(values.len());
                let bits: &mut [half::f16] = bits[..n].reinterpret_cast_mut();
                bits.convert_from_f32_slice(&values[..n]);
            }
        }
    }

    /// `widen` of each of `bits` into `values` (the common length).
    pub fn widen_into(self, bits: &[u16], values: &mut [f32]) {
        match self {
            Half::Bf16 => values
                .iter_mut()
                .zip(bits)
                .for_each(|(v, &b)| *v = f32::from_bits((b as u32) << 16)),
            Half::F16 => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let n = bits.len().min(values.len());
                let bits: &[half::f16] = bits[..n].reinterpret_cast();
                bits.convert_to_f32_slice(&mut values[..n]);
            }
        }
    }

    /// Each value of `x` rounded to this format and widened back, as `widen(narrow(v))`
    /// (bfloat16 in branch-free integer code the compiler vectorises, float16 through the
    /// `half` crate's slice conversions, which use F16C where the CPU has it).
    fn round_block(self, x: &mut [f32]) {
        match self {
            Half::Bf16 => {
                for v in x.iter_mut() {
                    *v = f32::from_bits((bf16_bits(*v) as u32) << 16);
                }
            }
            Half::F16 => {
                let mut bits = [0u16; 1024];
                for chunk in x.chunks_mut(bits.len()) {
                    let narrow = &mut bits[..chunk.len()];
                    self.narrow_into(chunk, narrow);
                    self.widen_into(narrow, chunk);
                }
            }
        }
    }
}

/// The bits of `v` rounded to bfloat16 (nearest, ties to even; a NaN stays a quiet NaN): what
/// `Half::Bf16.narrow` gives, in branch-free integer code the compiler vectorises.
#[inline]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    let is_nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if is_nan { nan } else { rounded }) as u16
}

/// A weight matrix as the kernels read it: float32, or half-precision bits widened on the fly.
#[derive(Clone, Copy)]
pub enum Matrix<'a> {
    F32(&'a [f32]),
    Half(&'a [u16], Half),
}

impl<'a> Matrix<'a> {
    /// Appends values `range` (rows of the matrix) to `out` as float32.
    pub fn extend_f32(&self, range: Range<usize>, out: &mut Vec<f32>) {
        match self {
            Matrix::F32(v) => out.extend_from_slice(&v[range]),
            Matrix::Half(v, h) => {
                let from = out.len();
                out.resize(from + range.len(), 0.0);
                h.widen_into(&v[range], &mut out[from..]);
            }
        }
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        match self {
            Matrix::F32(v) => v.len(),
            Matrix::Half(v, _) => v.len(),
        }
    }

    /// Whether the matrix holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as float32.
    pub fn value(&self, i: usize) -> f32 {
        match self {
            Matrix::F32(v) => v[i],
            Matrix::Half(v, h) => h.widen(v[i]),
        }
    }

    /// Values `range` (whole rows of the matrix).
    pub fn rows(self, range: Range<usize>) -> Self {
        match self {
            Matrix::F32(v) => Matrix::F32(&v[range]),
            Matrix::Half(v, h) => Matrix::Half(&v[range], h),
        }
    }
}

/// Where each run of the packed values lies in a weight image: runs of consecutive matrices
/// in half precision, runs of vectors in float32, each starting at a multiple of 64 bytes (so
/// that float32 runs are aligned and rows start on cache lines as often as the shapes allow).
/// For float32 the image is the packed buffer itself: one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub dtype: DType,
    runs: Vec<Run>,
    bytes: usize,
}

#[derive(Clone, Debug, PartialEq)]
struct Run {
    values: Range<usize>,
    byte: usize,
    half: bool,
}

const RUN_ALIGN: usize = 64;

impl Layout {
    pub fn new(cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let mut runs: Vec<Run> = Vec::new();
        let mut at = 0usize;
        for slot in packing(cfg) {
            let n = crate::tensor::numel(&slot.shape, "model")?;
            let half = dtype != DType::Float32 && slot.shape.len() == 2;
            match runs.last_mut() {
                Some(run) if run.half == half => run.values.end += n,
                _ => runs.push(Run {
                    values: at..at + n,
                    byte: 0,
                    half,
                }),
            }
            at = at
                .checked_add(n)
                .ok_or_else(|| EngineError::too_large("the model is too large"))?;
        }
        let mut bytes = 0usize;
        for run in &mut runs {
            run.byte = bytes.next_multiple_of(RUN_ALIGN);
            let size = if run.half { 2 } else { 4 };
            bytes = run
                .values
                .len()
                .checked_mul(size)
                .and_then(|b| b.checked_add(run.byte))
                .ok_or_else(|| EngineError::too_large("the model is too large"))?;
        }
        Ok(Self { dtype, runs, bytes })
    }

    /// Bytes of the whole image.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of packed values.
    pub fn values(&self) -> usize {
        self.runs.last().map_or(0, |r| r.values.end)
    }

    /// The run holding `range` (which never straddles two: a tensor is one slot, and q|k|v or
    /// any other multi-slot view joins slots of one kind).
    fn run(&self, range: &Range<usize>) -> &Run {
        let i = self.runs.partition_point(|r| r.values.end <= range.start);
        let run = &self.runs[i];
        assert!(
            range.end <= run.values.end,
            "values {range:?} straddle two runs of a weight image"
        );
        run
    }

    /// Byte offset and element size of packed value `at` (which lies in run `run`).
    fn place(run: &Run, at: usize) -> (usize, usize) {
        let size = if run.half { 2 } else { 4 };
        (run.byte + (at - run.values.start) * size, size)
    }

    /// The bytes of packed values `start..start + values.len()` in this layout, as (byte
    /// offset in the image, bytes) pieces, one per run they touch: the matrices' values rounded
    /// to the half format.
    pub fn encode(&self, start: usize, values: &[f32]) -> Vec<(usize, Vec<u8>)> {
        let mut pieces = Vec::new();
        let (mut pos, mut rest) = (start, values);
        while !rest.is_empty() {
            let run = self.run(&(pos..pos + 1));
            let n = rest.len().min(run.values.end - pos);
            let (byte, _) = Self::place(run, pos);
            let bytes = match self.dtype.half().filter(|_| run.half) {
                Some(h) => rest[..n]
                    .iter()
                    .flat_map(|&v| h.narrow(v).to_le_bytes())
                    .collect(),
                None => crate::tensor::le_bytes(&rest[..n]).into_owned(),
            };
            pieces.push((byte, bytes));
            pos += n;
            rest = &rest[n..];
        }
        pieces
    }

    /// Writes the image of `values` (all packed values) into `image` (`bytes()` long).
    pub fn encode_into(&self, image: &mut [u8], values: &[f32]) {
        for (byte, bytes) in self.encode(0, values) {
            image[byte..byte + bytes.len()].copy_from_slice(&bytes);
        }
    }

    /// Float32 values `range` of `image` (a vector, or any range of a float32 image).
    pub fn f32s<'a>(&self, image: &'a [u8], range: Range<usize>) -> &'a [f32] {
        let run = self.run(&range);
        assert!(!run.half, "a half-precision matrix read as float32");
        let (byte, _) = Self::place(run, range.start);
        let bytes = &image[byte..byte + range.len() * 4];
        // SAFETY: every bit pattern is a valid f32; alignment is checked below.
        let (head, floats, tail) = unsafe { bytes.align_to::<f32>() };
        assert!(
            head.is_empty() && tail.is_empty(),
            "weight image misaligned"
        );
        floats
    }

    /// Values `range` of `image` as the kernels read a matrix.
    pub fn matrix<'a>(&self, image: &'a [u8], range: Range<usize>) -> Matrix<'a> {
        let run = self.run(&range);
        match self.dtype.half().filter(|_| run.half) {
            None => Matrix::F32(self.f32s(image, range)),
            Some(h) => {
                let (byte, _) = Self::place(run, range.start);
                let bytes = &image[byte..byte + range.len() * 2];
                // SAFETY: every bit pattern is a valid u16; alignment is checked below.
                let (head, bits, tail) = unsafe { bytes.align_to::<u16>() };
                assert!(
                    head.is_empty() && tail.is_empty(),
                    "weight image misaligned"
                );
                Matrix::Half(bits, h)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The slice rounding (vectorised, on the pool) is `round` value by value, bit for bit:
    /// ties, both ends of each range, subnormals, infinities and NaN included.
    #[test]
    fn slices_round_as_values_do() {
        let mut values: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON * 64.0, // a bfloat16 tie
            65504.0,
            65520.0, // float16's overflow boundary
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-7,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        for dtype in [DType::Bfloat16, DType::Float16] {
            let mut rounded = values.clone();
            dtype.round_slice(&mut rounded);
            for (v, r) in values.iter().zip(&rounded) {
                let one = dtype.round(*v);
                assert!(
                    one.to_bits() == r.to_bits() || (one.is_nan() && r.is_nan()),
                    "{dtype:?}: {v:e} -> {r:e}, one at a time {one:e}"
                );
            }
            // The slice conversions of a half KV cache: bit for bit `narrow` and `widen`.
            let h = dtype.half().unwrap();
            let mut bits = vec![0u16; values.len()];
            h.narrow_into(&values, &mut bits);
            let mut wide = vec![0.0f32; values.len()];
            h.widen_into(&bits, &mut wide);
            for ((v, b), w) in values.iter().zip(&bits).zip(&wide) {
                let one = h.narrow(*v);
                assert!(
                    *b == one || (v.is_nan() && h.widen(*b).is_nan()),
                    "{dtype:?}: {v:e}"
                );
                assert_eq!(w.to_bits(), h.widen(*b).to_bits(), "{dtype:?}: {b:#x}");
            }
        }
    }

    use super::*;

    #[test]
    fn rounding_to_half_formats() {
        // bf16 keeps 8 significant bits: 1 + 2⁻⁸ is a tie and goes to the even 1.0.
        assert_eq!(DType::Bfloat16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(DType::Bfloat16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(DType::Float16.round(1.0 + 1.0 / 4096.0), 1.0);
        assert_eq!(DType::Float32.round(0.1), 0.1);
        let mut big = [1.0, 70000.0];
        assert!(matches!(
            DType::Float16.round_checked(&mut big, "w"),
            Err(EngineError::OutOfRange(_))
        ));
        let mut fine = [1e30f32, -3.5];
        DType::Bfloat16.round_checked(&mut fine, "w").unwrap();
        assert_eq!(fine[1], -3.5);
        for s in ["float32", "bfloat16", "float16"] {
            assert_eq!(DType::parse(s).unwrap().name(), s);
        }
        assert!(DType::parse("int8").is_err());
    }

    #[test]
    fn layout_keeps_vectors_in_float32_and_round_trips() {
        let cfg = ModelConfig::gpt3(2, 16, 2, 64);
        let n = crate::model::weights::packed_len(&cfg).unwrap();
        let values: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
        for dtype in [DType::Float32, DType::Bfloat16, DType::Float16] {
            let layout = Layout::new(&cfg, dtype).unwrap();
            assert_eq!(layout.values(), n);
            let mut image = vec![0u8; layout.bytes()];
            // Written in uneven pieces, as an import writes.
            for (k, piece) in values.chunks(1000).enumerate() {
                for (byte, bytes) in layout.encode(k * 1000, piece) {
                    image[byte..byte + bytes.len()].copy_from_slice(&bytes);
                }
            }
            let mut whole = vec![0u8; layout.bytes()];
            layout.encode_into(&mut whole, &values);
            assert_eq!(image, whole);
            for (name, range) in crate::model::weights::packed_tensors(&cfg) {
                let is_matrix = !name.contains("ln_") && !name.ends_with("bias");
                let got: Vec<f32> = match layout.matrix(&image, range.clone()) {
                    Matrix::F32(v) => v.to_vec(),
                    Matrix::Half(v, h) => {
                        assert!(is_matrix, "{name} should be float32");
                        v.iter().map(|&b| h.widen(b)).collect()
                    }
                };
                let want: Vec<f32> = values[range]
                    .iter()
                    .map(|&v| if is_matrix { dtype.round(v) } else { v })
                    .collect();
                assert_eq!(got, want, "{name} in {dtype:?}");
            }
        }
        let f32_layout = Layout::new(&cfg, DType::Float32).unwrap();
        assert_eq!(f32_layout.bytes(), 4 * n);
        let half = Layout::new(&cfg, DType::Bfloat16).unwrap();
        assert!(half.bytes() < 4 * n * 6 / 10);
    }
}
