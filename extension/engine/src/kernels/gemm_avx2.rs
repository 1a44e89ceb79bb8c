//! Float32 matrix products for AVX2 + FMA processors without AVX-512 (AMD Zen, Intel before
//! Skylake-X): BLIS-style cache blocking around a 6 × 16 register tile.
//!
//! Why not the `gemm` crate on these machines: on the project's 2-core AMD EPYC (Zen 3) its
//! products ran at 55 – 65 % of the FMA units' peak, and a linear layer's weights, stored
//! [out, in], had to be transposed slice by slice before it could pack them (its packing
//! gathers one value per cache line from that layout). This product packs both layouts
//! directly and keeps the tile's twelve accumulators in registers. Machines with AVX-512 keep
//! the `gemm` crate, whose AVX-512 kernels were measured there (docs/performance.md).
//! Weights served in bfloat16 or float16 are widened (exactly) as they are packed, so a
//! half-precision model's prompt pass needs no float32 copy of them.
//!
//! Loops, for C[m, n] (=|+=) A[m, k] · B[k, n] on one thread's block of C:
//!   jc: NC columns of B → pc: KC of the inner dimension, B[pc.., jc..] packed (≤ 2 MB, L3)
//!     → ic: MC rows of A, A[ic.., pc..] packed (144 KB, L2)
//!       → jr: NR columns → ir: MR rows: one tile (B's KC × NR panel, 16 KB, stays in L1).
//! Threads split C's columns (each packs only its own part of B, and all of A) or its rows
//! (the other way round), whichever packs the smaller operand twice.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::matmul::{Accumulate, MatRef};
use crate::model::dtype::Matrix;

/// Rows and columns of the register tile: 6 × 2 vectors of 8 accumulators, 2 vectors of B
/// and one broadcast of A make 15 of the 16 vector registers.
const MR: usize = 6;
const NR: usize = 16;
/// Inner-dimension block: a KC × NR panel of B (16 KB) stays in the 32 KB L1.
const KC: usize = 256;
/// Rows of A packed at once: MC × KC values (144 KB) stay in L2 (512 KB on Zen 3).
const MC: usize = 144;
/// Columns of B packed at once (a multiple of NR): KC × NC values, 2 MB. Wider than any
/// thread's share of a gpt3-125m product (A is packed once per NC columns).
const NC: usize = 2048;
/// Below this many multiply-adds a product runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Whether this product serves the machine: AVX2 and FMA, and no AVX-512 (checked once).
pub(crate) fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE
        .get_or_init(|| crate::simd::has_avx2_fma() && !std::is_x86_feature_detected!("avx512f"))
}

/// Whether a product of this shape should run here: at least a whole tile (narrower products
/// would spend most of each tile on padding; the `gemm` crate has vector paths for them).
pub(crate) fn suits(m: usize, n: usize) -> bool {
    m >= MR && n >= NR && available()
}

/// The right operand B [k, n] of a product.
#[derive(Clone, Copy)]
pub(crate) enum Rhs<'a> {
    /// Float32 values in any layout.
    F32(MatRef<'a>),
    /// B = Wᵀ for half-precision weights W [n, k] (a linear layer's weights served in
    /// bfloat16 or float16: `Matrix::Half` or `Matrix::Grouped`).
    HalfWeights { w: Matrix<'a>, n: usize, k: usize },
}

impl<'a> Rhs<'a> {
    /// Wᵀ for the half-precision weights `w` [n, k].
    pub(crate) fn half_weights(w: Matrix<'a>, n: usize, k: usize) -> Self {
        assert!(
            w.len() == n * k && !matches!(w, Matrix::F32(_)),
            "half weights: {} values for [{n}, {k}]",
            w.len()
        );
        Rhs::HalfWeights { w, n, k }
    }

    fn rows(&self) -> usize {
        match self {
            Rhs::F32(b) => b.rows(),
            Rhs::HalfWeights { k, .. } => *k,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Rhs::F32(b) => b.cols(),
            Rhs::HalfWeights { n, .. } => *n,
        }
    }

    /// Columns c0..c1 of B.
    pub(crate) fn col_range(self, c0: usize, c1: usize) -> Self {
        match self {
            Rhs::F32(b) => Rhs::F32(b.col_range(c0, c1)),
            Rhs::HalfWeights { w, k, .. } => Rhs::half_weights(w.rows(c0 * k..c1 * k), c1 - c0, k),
        }
    }
}

/// A destination shared by threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: every thread writes its own rows or columns of the destination (see `gemm`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// dst[r · dst_stride + c] = (or +=, with `Accumulate::Add`) Σ_p a(r, p) · b(p, c), on up to
/// `threads` threads of the current rayon pool. Needs AVX2 and FMA (`available()` also
/// leaves AVX-512 machines to the `gemm` crate, but the product runs there too: its tests do).
pub(crate) fn gemm(
    dst: &mut [f32],
    dst_stride: usize,
    a: MatRef,
    b: Rhs,
    acc: Accumulate,
    threads: usize,
) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert!(
        crate::simd::has_avx2_fma(),
        "gemm_avx2 on a machine without AVX2 and FMA"
    );
    assert_eq!(k, b.rows(), "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_stride >= n && dst.len() >= (m - 1) * dst_stride + n);
    if k == 0 {
        // An empty sum: no block of the inner dimension would write the result.
        if acc == Accumulate::Overwrite {
            dst.chunks_mut(dst_stride)
                .for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let overwrite = acc == Accumulate::Overwrite;
    let c = Dst(dst.as_mut_ptr());
    // SAFETY (all three calls): the blocks handed out are disjoint and inside dst (checked
    // above); a and b are bounds-checked views.
    let threads = if m * n * k < PARALLEL_MIN_WORK {
        1
    } else {
        threads
    };
    if threads <= 1 {
        return unsafe { gemm_block(c, dst_stride, a, b, 0..m, 0..n, overwrite) };
    }
    let (col_tiles, row_tiles) = (n.div_ceil(NR), m.div_ceil(MR));
    // Each thread packs all of the operand along the dimension not split: split so that the
    // smaller of A [m, k] and B [k, n] is the one packed twice.
    if col_tiles >= threads && (m <= n || row_tiles < threads) {
        let per = col_tiles.div_ceil(threads) * NR;
        (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
            let cols = t * per..((t + 1) * per).min(n);
            unsafe { gemm_block(c, dst_stride, a, b, 0..m, cols, overwrite) }
        });
    } else {
        let per = row_tiles.div_ceil(threads) * MR;
        (0..m.div_ceil(per)).into_par_iter().for_each(|t| {
            let rows = t * per..((t + 1) * per).min(m);
            unsafe { gemm_block(c, dst_stride, a, b, rows, 0..n, overwrite) }
        });
    }
}

thread_local! {
    /// Each thread's packing buffers (A's block, B's block), kept between products: a fresh
    /// 2 MB allocation per product would be fresh pages to fault in every time.
    static PACKED: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The rows × cols block of C, on the calling thread.
///
/// # Safety
/// `c` must point at a matrix with row stride `ldc` that holds every element of the block,
/// written by nobody else meanwhile.
unsafe fn gemm_block(
    c: Dst,
    ldc: usize,
    a: MatRef,
    b: Rhs,
    rows: Range<usize>,
    cols: Range<usize>,
    overwrite: bool,
) {
    PACKED.with(|packed| {
        let mut fresh = Default::default();
        // A product inside a product on the same thread cannot happen today; if it ever does
        // it gets buffers of its own rather than a panic.
        let mut held = packed.try_borrow_mut();
        let (a_buf, b_buf) = match held.as_mut() {
            Ok(bufs) => &mut **bufs,
            Err(_) => &mut fresh,
        };
        let k = a.cols();
        let kc_max = k.min(KC);
        let nc_max = cols.len().min(NC).next_multiple_of(NR);
        let mc_max = rows.len().min(MC).next_multiple_of(MR);
        let a_packed = aligned(a_buf, mc_max * kc_max);
        let b_packed = aligned(b_buf, kc_max * nc_max);
        for jc in cols.clone().step_by(NC) {
            let nc = NC.min(cols.end - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_b(b_packed, b, pc, kc, jc, nc);
                let first = overwrite && pc == 0;
                for ic in rows.clone().step_by(MC) {
                    let mc = MC.min(rows.end - ic);
                    pack_a(a_packed, a, ic, mc, pc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let b_panel = b_packed[jr * kc..].as_ptr();
                        for ir in (0..mc).step_by(MR) {
                            let a_panel = a_packed[ir * kc..].as_ptr();
                            let tile = c.0.add((ic + ir) * ldc + jc + jr);
                            let (mr, nr) = (MR.min(mc - ir), NR.min(nc - jr));
                            if mr == MR && nr == NR {
                                tile_6x16(kc, a_panel, b_panel, tile, ldc, first);
                            } else {
                                edge_tile(kc, a_panel, b_panel, tile, ldc, (mr, nr), first);
                            }
                        }
                    }
                }
            }
        }
    })
}

/// `len` values of `buf` starting on a 64-byte boundary (whole-line vector loads).
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    const LANES: usize = 16;
    if buf.len() < len + LANES {
        *buf = vec![0.0; len + LANES];
    }
    let skip = buf.as_ptr().align_offset(64).min(LANES);
    &mut buf[skip..skip + len]
}

/// A[ic..ic+mc, pc..pc+kc] as panels of MR rows: panel q holds value (q·MR + i, p) at
/// q·MR·kc + p·MR + i; rows past mc are zeros.
fn pack_a(packed: &mut [f32], a: MatRef, ic: usize, mc: usize, pc: usize, kc: usize) {
    let (data, rs, cs) = (a.data(), a.row_stride(), a.col_stride());
    for r0 in (0..mc).step_by(MR) {
        let panel = &mut packed[r0 * kc..(r0 + MR) * kc];
        if cs == 1 && r0 + MR <= mc {
            let rows: [&[f32]; MR] = std::array::from_fn(|i| {
                let start = (ic + r0 + i) * rs + pc;
                &data[start..start + kc]
            });
            // SAFETY: AVX2 is present (asserted in `gemm`); six rows of kc values, a panel of kc · MR.
            unsafe { pack_rows_6(panel, rows, kc) };
            continue;
        }
        if rs == 1 && r0 + MR <= mc {
            // A = Dᵀ with D stored [k, m] (a gradient's rows): six neighbours of each row of D.
            for (p, group) in panel.chunks_exact_mut(MR).enumerate() {
                let start = ic + r0 + (pc + p) * cs;
                group.copy_from_slice(&data[start..start + MR]);
            }
            continue;
        }
        for i in 0..MR {
            let start = (r0 + i < mc).then(|| (ic + r0 + i) * rs + pc * cs);
            gather_lane(panel, (MR, i), data, start, cs, kc);
        }
    }
}

/// B[pc..pc+kc, jc..jc+nc] as panels of NR columns: panel q holds value (p, q·NR + j) at
/// q·NR·kc + p·NR + j; columns past nc are zeros.
fn pack_b(packed: &mut [f32], b: Rhs, pc: usize, kc: usize, jc: usize, nc: usize) {
    match b {
        Rhs::F32(b) => pack_b_f32(packed, b, pc, kc, jc, nc),
        Rhs::HalfWeights { w, k, .. } => {
            for j0 in (0..nc).step_by(NR) {
                let panel = &mut packed[j0 * kc..(j0 + NR) * kc];
                let (first, width) = (jc + j0, NR.min(nc - j0));
                // Sixteen rows of W (whole groups of a grouped matrix: its column slices and
                // panels start at multiples of 16), or the last rows.
                let rows = w.rows(first * k..(first + width) * k);
                if width == NR {
                    // Columns pc..pc+kc transposed and widened in 8 × 8 register blocks:
                    // exactly the panel's layout.
                    crate::simd::transpose_cols(rows, NR, k, pc..pc + kc, panel);
                    continue;
                }
                for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
                    for (j, v) in out.iter_mut().enumerate() {
                        *v = if j < width {
                            rows.value(j * k + pc + p)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// `pack_b` of float32 values. Reads whole rows of either layout: B row-major ([k, n]), or
/// B = Wᵀ with W stored [n, k] (a linear layer's weights), whose columns are W's contiguous
/// rows.
fn pack_b_f32(packed: &mut [f32], b: MatRef, pc: usize, kc: usize, jc: usize, nc: usize) {
    let (data, rs, cs) = (b.data(), b.row_stride(), b.col_stride());
    for j0 in (0..nc).step_by(NR) {
        let panel = &mut packed[j0 * kc..(j0 + NR) * kc];
        let width = NR.min(nc - j0);
        if cs == 1 {
            for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
                let start = (pc + p) * rs + jc + j0;
                out[..width].copy_from_slice(&data[start..start + width]);
                out[width..].fill(0.0);
            }
        } else if rs == 1 && width == NR {
            // SAFETY: AVX2 is present (asserted in `gemm`); the panel's 16 rows of W hold kc values
            // each from `pc` (the view was bounds-checked).
            unsafe { pack_rows_transposed(panel, &data[pc + (jc + j0) * cs..], cs, kc) };
        } else {
            for j in 0..NR {
                let start = (j < width).then(|| pc * rs + (jc + j0 + j) * cs);
                gather_lane(panel, (NR, j), data, start, rs, kc);
            }
        }
    }
}

/// Lane `lane` of a panel `width` values wide (value p at p · width + lane) for p < kc:
/// data[start + p · step], or zeros past the matrix's edge (`start` None). The general path
/// of both packings (edge panels, other layouts).
fn gather_lane(
    panel: &mut [f32],
    (width, lane): (usize, usize),
    data: &[f32],
    start: Option<usize>,
    step: usize,
    kc: usize,
) {
    let lane_values = panel[lane..].iter_mut().step_by(width).take(kc);
    match start {
        None => lane_values.for_each(|v| *v = 0.0),
        Some(start) if step == 1 => lane_values
            .zip(&data[start..start + kc])
            .for_each(|(v, &x)| *v = x),
        Some(start) => lane_values
            // The view was bounds-checked: all kc values are there (zip cannot stop short).
            .zip(data[start..=start + (kc - 1) * step].iter().step_by(step))
            .for_each(|(v, &x)| *v = x),
    }
}

/// An A panel from six rows of A: eight values of each row at a time, read side by side
/// (six streams; one whole row after another waits on memory for every line) and transposed
/// in registers to eight groups of six.
///
/// # Safety
/// AVX2 present; each row holds kc values; `panel` holds kc · MR.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_rows_6(panel: &mut [f32], rows: [&[f32]; MR], kc: usize) {
    debug_assert!(rows.iter().all(|r| r.len() >= kc) && panel.len() >= kc * MR);
    let dst = panel.as_mut_ptr();
    let six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    let mut p = 0;
    while p + 8 <= kc {
        let zero = _mm256_setzero_ps();
        let r: [__m256; 8] = std::array::from_fn(|i| {
            if i < MR {
                _mm256_loadu_ps(rows[i].as_ptr().add(p))
            } else {
                zero
            }
        });
        for (q, col) in transpose8(r).into_iter().enumerate() {
            // Lanes 6 and 7 are padding: masked off (the next group starts there).
            _mm256_maskstore_ps(dst.add((p + q) * MR), six, col);
        }
        p += 8;
    }
    for p in p..kc {
        for (i, row) in rows.iter().enumerate() {
            *dst.add(p * MR + i) = row[p];
        }
    }
}

/// The transpose of an 8 × 8 block held as eight rows: column q of the input as vector q.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// A B panel from 16 rows of W (B = Wᵀ), W's row j at `w[j · stride..][..kc]`: eight rows
/// at a time, read side by side (eight streams the prefetchers follow; one row at a time
/// waits on memory for every line of weights not in cache), transposed 8 × 8 in registers.
///
/// # Safety
/// AVX2 present; `w` holds 15 · stride + kc values; `panel` holds kc · NR.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_rows_transposed(panel: &mut [f32], w: &[f32], stride: usize, kc: usize) {
    debug_assert!(w.len() >= 15 * stride + kc && panel.len() >= kc * NR);
    let (src, dst) = (w.as_ptr(), panel.as_mut_ptr());
    for half in 0..2 {
        let rows = src.add(half * 8 * stride);
        let mut p = 0;
        while p + 8 <= kc {
            let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(rows.add(j * stride + p)));
            // Column q of the 8 × 8 block (value p + q of each row).
            let cols = transpose8(r);
            for (q, col) in cols.into_iter().enumerate() {
                _mm256_storeu_ps(dst.add((p + q) * NR + half * 8), col);
            }
            p += 8;
        }
        for p in p..kc {
            for j in 0..8 {
                *dst.add(p * NR + half * 8 + j) = *rows.add(j * stride + p);
            }
        }
    }
}

/// The 6 × 16 tile at `c` (row stride `ldc`) = (or +=, unless `overwrite`) the product of an
/// A panel (kc × 6) and a B panel (kc × 16).
///
/// # Safety
/// AVX2 and FMA present; the panels hold kc · MR and kc · NR values; the tile is writable.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    // The tile's rows of C are far apart (a row of C each): ask for them now, so the loads
    // and stores after the loop do not wait on caches.
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + NR - 1) as *const i8);
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let step = |acc: &mut [[__m256; 2]; MR], p: usize| {
        let b0 = _mm256_load_ps(b.add(p * NR));
        let b1 = _mm256_load_ps(b.add(p * NR + 8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(p * MR + i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    };
    let mut p = 0;
    while p + 4 <= kc {
        step(&mut acc, p);
        step(&mut acc, p + 1);
        step(&mut acc, p + 2);
        step(&mut acc, p + 3);
        p += 4;
    }
    while p < kc {
        step(&mut acc, p);
        p += 1;
    }
    for (i, row) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        let (mut lo, mut hi) = (row[0], row[1]);
        if !overwrite {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(out));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(out.add(8)));
        }
        _mm256_storeu_ps(out, lo);
        _mm256_storeu_ps(out.add(8), hi);
    }
}

/// A tile cut by the edge of C (mr ≤ 6 rows, nr ≤ 16 columns): computed whole into a
/// scratch tile (the panels are zero-padded), then its valid part written.
///
/// # Safety
/// As `tile_6x16`, for the mr × nr part of the tile.
unsafe fn edge_tile(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    (mr, nr): (usize, usize),
    overwrite: bool,
) {
    let mut scratch = [0.0f32; MR * NR];
    tile_6x16(kc, a, b, scratch.as_mut_ptr(), NR, true);
    for i in 0..mr {
        let out = std::slice::from_raw_parts_mut(c.add(i * ldc), nr);
        let row = &scratch[i * NR..i * NR + nr];
        if overwrite {
            out.copy_from_slice(row);
        } else {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect()
    }

    fn at(v: &MatRef, r: usize, c: usize) -> f64 {
        v.data()[r * v.row_stride() + c * v.col_stride()] as f64
    }

    /// Every layout (A and B each row-major or transposed), edges in every direction, several
    /// KC / MC / NC blocks, overwrite and accumulate, one and several threads, a destination
    /// wider than the product.
    #[test]
    fn matches_a_naive_product() {
        // Every x86-64 machine this project runs on has AVX2 and FMA, AVX-512 ones included.
        assert!(crate::simd::has_avx2_fma(), "this test needs AVX2 and FMA");
        let shapes = [
            (6, 0, 16),
            (6, 1, 16),
            (7, 3, 17),
            (13, 300, 33),
            (150, 520, 70),
            (64, 96, 4100),
        ];
        for (m, k, n) in shapes {
            let (a_vals, b_vals) = (seq(m * k, 0.01), seq(k * n, 0.02));
            for a_t in [false, true] {
                for b_t in [false, true] {
                    let a = if a_t {
                        MatRef::transposed(&a_vals, m, k)
                    } else {
                        MatRef::new(&a_vals, m, k)
                    };
                    let b = if b_t {
                        MatRef::transposed(&b_vals, k, n)
                    } else {
                        MatRef::new(&b_vals, k, n)
                    };
                    let ldc = n + 3;
                    for (acc, threads) in [(Accumulate::Overwrite, 1), (Accumulate::Add, 3)] {
                        let mut dst = vec![0.5f32; m * ldc];
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap()
                            .install(|| gemm(&mut dst, ldc, a, Rhs::F32(b), acc, threads));
                        for r in 0..m {
                            for c in 0..ldc {
                                let got = dst[r * ldc + c] as f64;
                                let want = if c >= n {
                                    0.5
                                } else {
                                    let s: f64 = (0..k).map(|p| at(&a, r, p) * at(&b, p, c)).sum();
                                    s + if acc == Accumulate::Add { 0.5 } else { 0.0 }
                                };
                                assert!(
                                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                    "{m}x{k}x{n} a_t={a_t} b_t={b_t} {acc:?}: ({r}, {c}) {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Half-precision weights widened while packed give exactly the product of their float32
    /// widening (the same values, tiles and order), whole and by column slices, with panels
    /// cut by the edge and several KC blocks.
    #[test]
    fn half_weights_are_their_float32_widening() {
        assert!(crate::simd::has_avx2_fma(), "this test needs AVX2 and FMA");
        use crate::model::dtype::{grouped, Half};
        for h in [Half::Bf16, Half::F16] {
            for (m, k, n) in [
                (6, 8, 16),
                (7, 300, 37),
                (50, 520, 70),
                (9, 64, 37),
                (50, 512, 70),
            ] {
                let a_vals = seq(m * k, 0.01);
                let bits: Vec<u16> = seq(n * k, 0.02).iter().map(|&v| h.narrow(v)).collect();
                let widened: Vec<f32> = bits.iter().map(|&b| h.widen(b)).collect();
                let a = MatRef::new(&a_vals, m, k);
                let grouped_bits = grouped(&bits, k);
                let half = if k % 16 == 0 {
                    Rhs::half_weights(Matrix::Grouped(&grouped_bits, h, k), n, k)
                } else {
                    Rhs::half_weights(Matrix::Half(&bits, h), n, k)
                };
                let full = Rhs::F32(MatRef::transposed(&widened, k, n));
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(2)
                    .build()
                    .unwrap();
                let product = |b: Rhs, dst: &mut [f32]| {
                    pool.install(|| gemm(dst, n, a, b, Accumulate::Overwrite, 2))
                };
                let (mut got, mut want) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
                product(full, &mut want);
                product(half, &mut got);
                assert_eq!(got, want, "{h:?} {m}x{k}x{n}");
                let mut sliced = vec![0.0f32; m * n];
                let cut = n / 2 / 16 * 16; // where slices start: whole groups
                product(half.col_range(0, cut), &mut sliced);
                product(half.col_range(cut, n), &mut sliced[cut..]);
                assert_eq!(sliced, want, "{h:?} {m}x{k}x{n} in two slices");
            }
        }
    }
}
