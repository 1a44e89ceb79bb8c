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

/// Rows per group, and values per chunk, of the grouped order (`Matrix::Grouped`).
pub const GROUP_ROWS: usize = 4;
pub const GROUP_CHUNK: usize = 16;

/// Where value (r, c) of a [rows, cols] matrix lies in the grouped order: rows in groups of
/// four, each group's rows interleaved sixteen values at a time (chunk c/16 of rows 4g..4g+4,
/// then the next chunk), the last rows % 4 rows row-major. A group starts where its first row
/// would in row-major order, so whole groups of rows are the same range in both orders.
#[inline]
pub fn grouped_index(r: usize, c: usize, rows: usize, cols: usize) -> usize {
    if r >= rows / GROUP_ROWS * GROUP_ROWS {
        return r * cols + c;
    }
    let group = r / GROUP_ROWS * GROUP_ROWS * cols;
    group + (c / GROUP_CHUNK * GROUP_ROWS + r % GROUP_ROWS) * GROUP_CHUNK + c % GROUP_CHUNK
}

/// A weight matrix as the kernels read it: float32, or half-precision bits widened on the fly.
#[derive(Clone, Copy)]
pub enum Matrix<'a> {
    F32(&'a [f32]),
    /// Half-precision bits, row-major (a half-precision KV cache, or a weight matrix whose
    /// rows are not whole chunks).
    Half(&'a [u16], Half),
    /// Half-precision bits of a matrix of `cols` values per row (a multiple of 16) in the
    /// grouped order (`grouped_index`): how a weight image holds its matrices, so that a
    /// decode step reads each group of four rows as one sequential stream instead of four
    /// streams a row apart (bfloat16 streamed 15 – 25 % faster so on AMD EPYC).
    Grouped(&'a [u16], Half, usize),
}

impl<'a> Matrix<'a> {
    /// Appends values `range` (whole rows of the matrix) to `out` as float32.
    pub fn extend_f32(&self, range: Range<usize>, out: &mut Vec<f32>) {
        match self {
            Matrix::F32(v) => out.extend_from_slice(&v[range]),
            Matrix::Half(v, h) => {
                let from = out.len();
                out.resize(from + range.len(), 0.0);
                h.widen_into(&v[range], &mut out[from..]);
            }
            Matrix::Grouped(v, h, cols) => {
                assert!(
                    range.start.is_multiple_of(*cols) && range.len().is_multiple_of(*cols),
                    "grouped matrix: values {range:?} are not whole rows of {cols}"
                );
                // A row's chunks are contiguous: one position per chunk.
                for i in range.step_by(GROUP_CHUNK) {
                    let at = self.position(i);
                    out.extend(v[at..at + GROUP_CHUNK].iter().map(|&b| h.widen(b)));
                }
            }
        }
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        match self {
            Matrix::F32(v) => v.len(),
            Matrix::Half(v, _) | Matrix::Grouped(v, _, _) => v.len(),
        }
    }

    /// Whether the matrix holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where value `i` (row-major numbering) is held: i itself, or its place in the grouped
    /// order.
    pub fn position(&self, i: usize) -> usize {
        match self {
            Matrix::F32(_) | Matrix::Half(..) => i,
            Matrix::Grouped(v, _, cols) => grouped_index(i / cols, i % cols, v.len() / cols, *cols),
        }
    }

    /// Value `i` (row-major numbering) as float32.
    pub fn value(&self, i: usize) -> f32 {
        match self {
            Matrix::F32(v) => v[i],
            Matrix::Half(v, h) | Matrix::Grouped(v, h, _) => h.widen(v[self.position(i)]),
        }
    }

    /// Values `range` (whole rows of the matrix; of a grouped matrix, whole groups of rows,
    /// or groups then the rows to its end).
    pub fn rows(self, range: Range<usize>) -> Self {
        match self {
            Matrix::F32(v) => Matrix::F32(&v[range]),
            Matrix::Half(v, h) => Matrix::Half(&v[range], h),
            Matrix::Grouped(v, h, cols) => {
                let group = GROUP_ROWS * cols;
                assert!(
                    range.start.is_multiple_of(group)
                        && (range.end.is_multiple_of(group) || range.end == v.len()),
                    "grouped matrix: values {range:?} split a group of rows"
                );
                Matrix::Grouped(&v[range], h, cols)
            }
        }
    }
}

/// Where each run of the packed values lies in a weight image: runs of consecutive matrices
/// in half precision, runs of vectors in float32, each starting at a multiple of 64 bytes (so
/// that float32 runs are aligned and rows start on cache lines as often as the shapes allow).
/// For float32 the image is the packed buffer itself: one run. Half-precision matrices whose
/// rows are whole 16-value chunks are held in the grouped order (`grouped_index`); q, k and v
/// of a layer are grouped as the one matrix the forward pass reads them as.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub dtype: DType,
    runs: Vec<Run>,
    groups: Vec<Grouped>,
    bytes: usize,
}

/// Packed values `values` form a [values.len() / cols, cols] matrix held in the grouped order.
#[derive(Clone, Debug, PartialEq)]
struct Grouped {
    values: Range<usize>,
    cols: usize,
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
        let mut groups: Vec<Grouped> = Vec::new();
        let mut at = 0usize;
        for slot in packing(cfg) {
            let n = crate::tensor::numel(&slot.shape, "model")?;
            let half = dtype != DType::Float32 && slot.shape.len() == 2;
            let cols = slot.shape.last().copied().unwrap_or(0);
            if half && cols > 0 && cols.is_multiple_of(GROUP_CHUNK) {
                match groups.last_mut() {
                    Some(g) if slot.joins_previous() && g.values.end == at && g.cols == cols => {
                        g.values.end += n
                    }
                    _ => groups.push(Grouped {
                        values: at..at + n,
                        cols,
                    }),
                }
            }
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
        Ok(Self {
            dtype,
            runs,
            groups,
            bytes,
        })
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

    /// The grouped matrix holding packed value `at`, if any.
    fn group(&self, at: usize) -> Option<&Grouped> {
        let i = self.groups.partition_point(|g| g.values.end <= at);
        self.groups.get(i).filter(|g| g.values.start <= at)
    }

    /// The bytes of packed values `start..start + values.len()` in this layout, as (byte
    /// offset in the image, bytes) pieces: the matrices' values rounded to the half format. A
    /// run of float32 values or of row-major bits is one piece, whole groups of rows of a
    /// grouped matrix are one piece each, and the rows of a group written in part are pieces
    /// of at most 16 values (an import writes in chunks that rarely end on a group).
    pub fn encode(&self, start: usize, values: &[f32]) -> Vec<(usize, Vec<u8>)> {
        let mut pieces = Vec::new();
        let (mut pos, mut rest) = (start, values);
        while !rest.is_empty() {
            let run = self.run(&(pos..pos + 1));
            let mut n = rest.len().min(run.values.end - pos);
            let (byte, _) = Self::place(run, pos);
            match self.dtype.half().filter(|_| run.half) {
                None => pieces.push((byte, crate::tensor::le_bytes(&rest[..n]).into_owned())),
                Some(h) => match self.group(pos) {
                    Some(g) => {
                        n = n.min(g.values.end - pos);
                        let first = pos - g.values.start;
                        let at = |local: usize| byte + (local - first) * 2;
                        encode_grouped(&rest[..n], first, g, h, at, &mut pieces);
                    }
                    None => {
                        let next = self.groups.iter().find(|g| g.values.start > pos);
                        n = n.min(next.map_or(usize::MAX, |g| g.values.start - pos));
                        pieces.push((byte, half_bytes(&rest[..n], h)));
                    }
                },
            }
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
                let Some(g) = self.group(range.start) else {
                    return Matrix::Half(bits, h);
                };
                // Whole groups of the grouped matrix, then possibly the rest of its rows:
                // a grouped matrix of its own (`Matrix::rows` checks the same).
                let group = GROUP_ROWS * g.cols;
                assert!(
                    range.end <= g.values.end
                        && (range.start - g.values.start).is_multiple_of(group)
                        && (range.len().is_multiple_of(group) || range.end == g.values.end),
                    "values {range:?} split a group of rows of a grouped matrix"
                );
                Matrix::Grouped(bits, h, g.cols)
            }
        }
    }
}

/// Values of half-precision matrix `g` from its value `first` on (row-major numbering), in
/// the grouped order: whole groups as one piece each, the rest as pieces of at most one
/// chunk; `at(local)` is the byte offset of the group's value `local` (grouped numbering).
fn encode_grouped(
    values: &[f32],
    first: usize,
    g: &Grouped,
    h: Half,
    at: impl Fn(usize) -> usize,
    pieces: &mut Vec<(usize, Vec<u8>)>,
) {
    let (cols, len) = (g.cols, g.values.len());
    let (rows, group) = (len / cols, GROUP_ROWS * cols);
    let end = first + values.len();
    let mut pos = first;
    while pos < end {
        if pos.is_multiple_of(group) && pos + group <= end && pos / cols + GROUP_ROWS <= rows {
            // A whole group: its values reordered, then one piece.
            let mut bits = vec![0u16; group];
            let src = &values[pos - first..pos - first + group];
            for (r, row) in src.chunks_exact(cols).enumerate() {
                for (c, chunk) in row.chunks_exact(GROUP_CHUNK).enumerate() {
                    let to = (c * GROUP_ROWS + r) * GROUP_CHUNK;
                    h.narrow_into(chunk, &mut bits[to..to + GROUP_CHUNK]);
                }
            }
            pieces.push((at(pos), bits.iter().flat_map(|b| b.to_le_bytes()).collect()));
            pos += group;
            continue;
        }
        // Up to the end of this chunk of a row (a row of the row-major rest: to its end).
        let (r, c) = (pos / cols, pos % cols);
        let stop = if r >= rows / GROUP_ROWS * GROUP_ROWS {
            end
        } else {
            end.min(pos - c % GROUP_CHUNK + GROUP_CHUNK)
        };
        let to = grouped_index(r, c, rows, cols);
        pieces.push((at(to), half_bytes(&values[pos - first..stop - first], h)));
        pos = stop;
    }
}

/// Row-major bits of a [bits.len() / cols, cols] matrix in the grouped order (for tests).
#[cfg(test)]
pub(crate) fn grouped(bits: &[u16], cols: usize) -> Vec<u16> {
    if cols == 0 || !cols.is_multiple_of(GROUP_CHUNK) {
        return bits.to_vec(); // rows that are not whole chunks are not grouped
    }
    let rows = bits.len() / cols;
    let mut out = vec![0u16; bits.len()];
    for (i, &b) in bits.iter().enumerate() {
        out[grouped_index(i / cols, i % cols, rows, cols)] = b;
    }
    out
}

/// `values` rounded to `h`, as little-endian bytes.
fn half_bytes(values: &[f32], h: Half) -> Vec<u8> {
    let mut bits = vec![0u16; values.len()];
    h.narrow_into(values, &mut bits);
    bits.iter().flat_map(|b| b.to_le_bytes()).collect()
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
        // Rows of 16 values (grouped; the head's 50257 rows end in one row-major row) and of
        // 24 (row-major).
        for d_model in [16, 24] {
            round_trip(&ModelConfig::gpt3(2, d_model, 2, 64));
        }
    }

    fn round_trip(cfg: &ModelConfig) {
        let cols: std::collections::HashMap<String, usize> = packing(cfg)
            .into_iter()
            .filter_map(|slot| Some((slot.name?, *slot.shape.last()?)))
            .collect();
        let n = crate::model::weights::packed_len(cfg).unwrap();
        let values: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
        for dtype in [DType::Float32, DType::Bfloat16, DType::Float16] {
            let layout = Layout::new(cfg, dtype).unwrap();
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
            let tensors = crate::model::weights::packed_tensors(cfg);
            // q|k|v read as one matrix, as the forward pass reads them.
            let range_of = |want: &str| {
                let found = tensors.iter().find(|(name, _)| name == want);
                found.unwrap().1.clone()
            };
            let q = range_of("layers.1.attn.q_proj.weight");
            let joined = q.start..range_of("layers.1.attn.v_proj.weight").end;
            let views = tensors
                .into_iter()
                .chain([("layers.1.attn.q_proj.weight+k+v".to_string(), joined)]);
            for (name, range) in views {
                let is_matrix = !name.contains("ln_") && !name.ends_with("bias");
                let grouped = cols[name.split('+').next().unwrap()].is_multiple_of(GROUP_CHUNK);
                let m = layout.matrix(&image, range.clone());
                match m {
                    Matrix::F32(_) => assert!(!is_matrix || dtype == DType::Float32, "{name}"),
                    Matrix::Half(..) => assert!(is_matrix && !grouped, "{name} in {dtype:?}"),
                    Matrix::Grouped(..) => assert!(is_matrix && grouped, "{name} in {dtype:?}"),
                }
                let got: Vec<f32> = (0..range.len()).map(|i| m.value(i)).collect();
                let want: Vec<f32> = values[range]
                    .iter()
                    .map(|&v| if is_matrix { dtype.round(v) } else { v })
                    .collect();
                assert_eq!(got, want, "{name} in {dtype:?}");
            }
        }
        let f32_layout = Layout::new(cfg, DType::Float32).unwrap();
        assert_eq!(f32_layout.bytes(), 4 * n);
        let half = Layout::new(cfg, DType::Bfloat16).unwrap();
        assert!(half.bytes() < 4 * n * 6 / 10);
    }
}
