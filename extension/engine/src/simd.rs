//! Runtime CPU-feature dispatch for the few loops that the compiler vectorises well once it may
//! use AVX2 and FMA. The binary stays portable: the baseline path runs on any x86-64.

use crate::model::dtype::{Half, Matrix};

/// Whether AVX2 and FMA are available (checked once; cached by std).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether AVX2, FMA and F16C are available: what the half-precision AVX2 kernels use.
#[inline]
fn has_avx2_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The largest `key` of the values' bits: the block scan of every finiteness check, a max
/// reduction that needs AVX2's unsigned 32-bit max to vectorise (SSE2 has none).
#[inline]
pub fn max_key(values: &[f32], key: &impl Fn(u32) -> u32) -> u32 {
    #[inline(always)]
    fn body(values: &[f32], key: &impl Fn(u32) -> u32) -> u32 {
        values.iter().fold(0, |m, v| m.max(key(v.to_bits())))
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn body_avx2(values: &[f32], key: &impl Fn(u32) -> u32) -> u32 {
        body(values, key)
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was detected at run time.
        return unsafe { body_avx2(values, key) };
    }
    body(values, key)
}

/// y[j] += a · x[j]. Fused multiply-add only where the CPU has it (it is slow in software).
#[inline(always)]
fn axpy_body<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = if FMA {
            xv.mul_add(a, *yv)
        } else {
            *yv + a * xv
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_body::<true>(y, a, x)
}

/// y += a · x over the common length.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { axpy_avx2(y, a, x) };
    }
    axpy_body::<false>(y, a, x)
}

/// y[j] += Σ_r a[r] · x[r][j] for four rows at once: y is read and written once per four rows.
#[inline(always)]
fn axpy4_body<const FMA: bool>(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    let n = y
        .len()
        .min(x[0].len())
        .min(x[1].len())
        .min(x[2].len())
        .min(x[3].len());
    let (y, x0, x1, x2, x3) = (&mut y[..n], &x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for j in 0..n {
        y[j] = if FMA {
            x3[j].mul_add(
                a[3],
                x2[j].mul_add(a[2], x1[j].mul_add(a[1], x0[j].mul_add(a[0], y[j]))),
            )
        } else {
            y[j] + a[0] * x0[j] + a[1] * x1[j] + a[2] * x2[j] + a[3] * x3[j]
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy4_avx2(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    axpy4_body::<true>(y, a, x)
}

/// y += a[0]·x[0] + a[1]·x[1] + a[2]·x[2] + a[3]·x[3] over the common length.
#[inline]
pub fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { axpy4_avx2(y, a, x) };
    }
    axpy4_body::<false>(y, a, x)
}

/// The sum of a dot product's sixteen partial sums, as a tree: lanes i and i+8, then i and
/// i+4, then i and i+2, then the last two. Every dot kernel below sums this way (the vector
/// kernels with shuffles), so each gives the same bits as `dot`; a tree costs a few vector
/// additions where a running sum would cost sixteen dependent ones.
#[inline(always)]
fn sum16(a: [f32; 16]) -> f32 {
    let b: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
    let c: [f32; 4] = std::array::from_fn(|i| b[i] + b[i + 4]);
    (c[0] + c[2]) + (c[1] + c[3])
}

/// Σ x[i]·y[i] with sixteen independent partial sums so the loop vectorises.
#[inline(always)]
fn dot_body<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [0.0f32; 16];
    let chunks = n / 16;
    for c in 0..chunks {
        let (xs, ys) = (&x[c * 16..c * 16 + 16], &y[c * 16..c * 16 + 16]);
        for i in 0..16 {
            acc[i] = if FMA {
                xs[i].mul_add(ys[i], acc[i])
            } else {
                acc[i] + xs[i] * ys[i]
            };
        }
    }
    let mut sum = sum16(acc);
    for i in chunks * 16..n {
        sum += x[i] * y[i];
    }
    sum
}

/// `dot_body::<true>` with intrinsics (written out, the compiler splits the sixteen partial
/// sums into two-lane pieces): lanes 0-7 and 8-15 are one register each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let chunks = n / 16;
    let (xp, yp) = (x.as_ptr(), y.as_ptr());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in 0..chunks {
        let at = c * 16;
        // y is a row of a weight matrix or of a head's keys: the rows after it follow.
        _mm_prefetch::<_MM_HINT_T0>(yp.wrapping_add(at + PREFETCH_AHEAD) as *const i8);
        // SAFETY: at + 16 <= n.
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(at)), _mm256_loadu_ps(yp.add(at)), lo);
        hi = _mm256_fmadd_ps(
            _mm256_loadu_ps(xp.add(at + 8)),
            _mm256_loadu_ps(yp.add(at + 8)),
            hi,
        );
    }
    let mut sum = sum16_avx2(_mm256_add_ps(lo, hi));
    for i in chunks * 16..n {
        sum += x[i] * y[i];
    }
    sum
}

/// Dot product over the common length.
#[inline]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_avx2(x, y) };
    }
    dot_body::<false>(x, y)
}

/// `dot(x, w[r])` for R weight rows at once (a one-row product streaming a weight matrix):
/// each row's result has exactly `dot`'s arithmetic, while each chunk of x is loaded once for
/// all R and the weights after them are prefetched.
#[inline]
pub fn dot_rows<const R: usize>(x: &[f32], w: [&[f32]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_rows_avx2(x, w) };
    }
    w.map(|row| dot_body::<false>(x, row))
}

/// `dot_avx2` for R rows: lanes 0-7 and 8-15 of each row's partial sums in one register each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<const R: usize>(x: &[f32], w: [&[f32]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let n = w.iter().fold(x.len(), |n, r| n.min(r.len()));
    let chunks = n / 16;
    let (xp, wp) = (x.as_ptr(), w.map(|r| r.as_ptr()));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for c in 0..chunks {
        let at = c * 16;
        // SAFETY: at + 16 <= n, which every slice's length bounds.
        let (x_lo, x_hi) = (_mm256_loadu_ps(xp.add(at)), _mm256_loadu_ps(xp.add(at + 8)));
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T0>(wp[r].wrapping_add(at + PREFETCH_AHEAD) as *const i8);
            acc[r][0] = _mm256_fmadd_ps(x_lo, _mm256_loadu_ps(wp[r].add(at)), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x_hi, _mm256_loadu_ps(wp[r].add(at + 8)), acc[r][1]);
        }
    }
    std::array::from_fn(|r| {
        let mut sum = sum16_avx2(_mm256_add_ps(acc[r][0], acc[r][1]));
        for i in chunks * 16..n {
            sum += x[i] * w[r][i];
        }
        sum
    })
}

/// `dot(x[r], y)` for four rows x at once: each row's result has exactly `dot`'s arithmetic
/// (the same sixteen partial sums, summed by the same tree), so it does not depend on which rows
/// are computed beside it, while each chunk of y is loaded once for the four.
#[inline(always)]
fn dot4_body<const FMA: bool>(x: [&[f32]; 4], y: &[f32]) -> [f32; 4] {
    let n = x.iter().fold(y.len(), |n, r| n.min(r.len()));
    let mut acc = [[0.0f32; 16]; 4];
    let chunks = n / 16;
    for c in 0..chunks {
        let ys = &y[c * 16..c * 16 + 16];
        for (acc, x) in acc.iter_mut().zip(&x) {
            let xs = &x[c * 16..c * 16 + 16];
            for i in 0..16 {
                acc[i] = if FMA {
                    xs[i].mul_add(ys[i], acc[i])
                } else {
                    acc[i] + xs[i] * ys[i]
                };
            }
        }
    }
    let mut out = [0.0f32; 4];
    for ((o, acc), x) in out.iter_mut().zip(&acc).zip(&x) {
        let mut sum = sum16(*acc);
        for i in chunks * 16..n {
            sum += x[i] * y[i];
        }
        *o = sum;
    }
    out
}

/// `sum16`'s last three levels on `b` = the first level's eight sums (lanes i and i+8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sum16_avx2(b: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps::<1>(b));
    let d = _mm_add_ps(c, _mm_movehl_ps(c, c)); // c0+c2, c1+c3
    _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps::<1>(d, d)))
}

/// `sum16` of the sixteen lanes of `a`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn sum16_avx512(a: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm512_castps512_ps256(a);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    sum16_avx2(_mm256_add_ps(lo, hi))
}

/// `dot4_body::<true>` written with intrinsics (the compiler does not keep its sixteen-lane
/// accumulators of four rows in registers): lanes 0-7 and 8-15 of each row's partial sums are
/// one register each, updated with the same fused multiply-adds, then summed as `sum16` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(x: [&[f32]; 4], y: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::{_mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps};
    let n = x.iter().fold(y.len(), |n, r| n.min(r.len()));
    let chunks = n / 16;
    let (yp, xp) = (y.as_ptr(), x.map(|r| r.as_ptr()));
    let mut lo = [_mm256_setzero_ps(); 4];
    let mut hi = [_mm256_setzero_ps(); 4];
    for c in 0..chunks {
        let at = c * 16;
        // SAFETY: at + 16 <= n, which every slice's length bounds.
        let (y0, y1) = (_mm256_loadu_ps(yp.add(at)), _mm256_loadu_ps(yp.add(at + 8)));
        for r in 0..4 {
            lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[r].add(at)), y0, lo[r]);
            hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[r].add(at + 8)), y1, hi[r]);
        }
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        let mut sum = sum16_avx2(_mm256_add_ps(lo[r], hi[r]));
        for i in chunks * 16..n {
            sum += x[r][i] * y[i];
        }
        out[r] = sum;
    }
    out
}

/// `[dot(x[0], y), dot(x[1], y), dot(x[2], y), dot(x[3], y)]`, bit for bit, in one pass over y.
#[inline]
pub fn dot4(x: [&[f32]; 4], y: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { dot4_avx2(x, y) };
    }
    dot4_body::<false>(x, y)
}

/// Whether AVX-512F is available (checked once; cached by std).
#[inline]
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Eight rows' sixteen-lane partial sums are one 512-bit register each: the same fused
/// multiply-adds per lane as `dot`, summed as `sum16` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot8_avx512(x: [&[f32]; 8], y: &[f32]) -> [f32; 8] {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps};
    let n = x.iter().fold(y.len(), |n, r| n.min(r.len()));
    let chunks = n / 16;
    let (yp, xp) = (y.as_ptr(), x.map(|r| r.as_ptr()));
    let mut acc = [_mm512_setzero_ps(); 8];
    for c in 0..chunks {
        let at = c * 16;
        // SAFETY: at + 16 <= n, which every slice's length bounds.
        let y16 = _mm512_loadu_ps(yp.add(at));
        for r in 0..8 {
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xp[r].add(at)), y16, acc[r]);
        }
    }
    let mut out = [0.0f32; 8];
    for r in 0..8 {
        let mut sum = sum16_avx512(acc[r]);
        for i in chunks * 16..n {
            sum += x[r][i] * y[i];
        }
        out[r] = sum;
    }
    out
}

/// `dot8` against two vectors y at once (two weight rows): 16 accumulators, and each row of x
/// loaded once for both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot8x2_avx512(x: [&[f32]; 8], y: [&[f32]; 2]) -> [[f32; 8]; 2] {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps};
    let n = x
        .iter()
        .fold(y[0].len().min(y[1].len()), |n, r| n.min(r.len()));
    let chunks = n / 16;
    let (ya, yb, xp) = (y[0].as_ptr(), y[1].as_ptr(), x.map(|r| r.as_ptr()));
    let mut acc_a = [_mm512_setzero_ps(); 8];
    let mut acc_b = [_mm512_setzero_ps(); 8];
    for c in 0..chunks {
        let at = c * 16;
        // SAFETY: at + 16 <= n, which every slice's length bounds.
        let (va, vb) = (_mm512_loadu_ps(ya.add(at)), _mm512_loadu_ps(yb.add(at)));
        for r in 0..8 {
            let xv = _mm512_loadu_ps(xp[r].add(at));
            acc_a[r] = _mm512_fmadd_ps(xv, va, acc_a[r]);
            acc_b[r] = _mm512_fmadd_ps(xv, vb, acc_b[r]);
        }
    }
    let mut out = [[0.0f32; 8]; 2];
    for (o, (acc, y)) in out.iter_mut().zip([(acc_a, y[0]), (acc_b, y[1])]) {
        for r in 0..8 {
            let mut sum = sum16_avx512(acc[r]);
            for i in chunks * 16..n {
                sum += x[r][i] * y[i];
            }
            o[r] = sum;
        }
    }
    out
}

/// One half of `dot`'s sixteen partial sums (lanes 0-7 with `off` = 0, lanes 8-15 with `off` =
/// 8) of R rows x against W rows y, over `chunks` chunks of sixteen: acc[w][r] holds the eight
/// lanes of x[r]·y[w], each updated with the same fused multiply-adds as in `dot_avx2`. With
/// only half the lanes at a time, R·W accumulators fit in the sixteen ymm registers beside the
/// W rows of y, and each load of x or y feeds W or R multiply-adds. Meanwhile the cache lines
/// of `ahead` are prefetched into L2, one per chunk (a hint: the sums do not depend on it).
///
/// # Safety
/// Every pointer must be valid for `chunks * 16` floats, and the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_half_avx2<const R: usize, const W: usize>(
    xp: [*const f32; R],
    yp: [*const f32; W],
    chunks: usize,
    off: usize,
    ahead: &[f32],
) -> [[std::arch::x86_64::__m256; R]; W] {
    use std::arch::x86_64::{
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm_prefetch, _MM_HINT_T1,
    };
    let mut acc = [[_mm256_setzero_ps(); R]; W];
    let mut yv = [_mm256_setzero_ps(); W];
    for c in 0..chunks {
        if c * 16 < ahead.len() {
            _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(c * 16).cast());
        }
        let at = c * 16 + off;
        // SAFETY: at + 8 <= chunks * 16, which the caller guarantees to be in bounds.
        for w in 0..W {
            yv[w] = _mm256_loadu_ps(yp[w].add(at));
        }
        for r in 0..R {
            let xv = _mm256_loadu_ps(xp[r].add(at));
            for w in 0..W {
                acc[w][r] = _mm256_fmadd_ps(xv, yv[w], acc[w][r]);
            }
        }
    }
    acc
}

/// `[dot4(x, y[0]), dot4(x, y[1])]` bit for bit, for AVX2 without AVX-512: lanes 0-7 of the
/// eight dot products over all chunks, then lanes 8-15 (`dot_half_avx2`; the rows stay in L1
/// between the two passes), then `sum16` and the scalar tail as `dot_avx2` does. About 0.75
/// loads per fused multiply-add where two `dot4` calls make 1.25. The two passes prefetch
/// `ahead[0]` and `ahead[1]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4x2_avx2(x: [&[f32]; 4], y: [&[f32]; 2], ahead: [&[f32]; 2]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::_mm256_add_ps;
    let n = x
        .iter()
        .fold(y[0].len().min(y[1].len()), |n, r| n.min(r.len()));
    let chunks = n / 16;
    let (xp, yp) = (x.map(|r| r.as_ptr()), y.map(|r| r.as_ptr()));
    // SAFETY: chunks * 16 <= n, which every slice's length bounds.
    let lo = dot_half_avx2::<4, 2>(xp, yp, chunks, 0, ahead[0]);
    let hi = dot_half_avx2::<4, 2>(xp, yp, chunks, 8, ahead[1]);
    let mut out = [[0.0f32; 4]; 2];
    for w in 0..2 {
        for r in 0..4 {
            let mut sum = sum16_avx2(_mm256_add_ps(lo[w][r], hi[w][r]));
            for i in chunks * 16..n {
                sum += x[r][i] * y[w][i];
            }
            out[w][r] = sum;
        }
    }
    out
}

/// `[dot8(x, y[0]), dot8(x, y[1])]`, bit for bit. `ahead` is what the caller reads next (the
/// following weight rows, or nothing): the AVX2 path prefetches it while it computes, so the
/// memory stays busy while its later passes over y run from L1 (a hint only: the results do
/// not depend on it; the AVX-512 path ignores it).
#[inline]
pub fn dot8x2(x: [&[f32]; 8], y: [&[f32]; 2], ahead: &[f32]) -> [[f32; 8]; 2] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the features were detected at run time.
        return unsafe { dot8x2_avx512(x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // A quarter of `ahead` in each of the four passes.
        let q = ahead.len().div_ceil(4);
        let part = |k: usize| &ahead[(k * q).min(ahead.len())..((k + 1) * q).min(ahead.len())];
        // SAFETY: the features were detected at run time.
        let [a0, a1] = unsafe { dot4x2_avx2([x[0], x[1], x[2], x[3]], y, [part(0), part(1)]) };
        let [b0, b1] = unsafe { dot4x2_avx2([x[4], x[5], x[6], x[7]], y, [part(2), part(3)]) };
        return [
            [a0[0], a0[1], a0[2], a0[3], b0[0], b0[1], b0[2], b0[3]],
            [a1[0], a1[1], a1[2], a1[3], b1[0], b1[1], b1[2], b1[3]],
        ];
    }
    [dot8(x, y[0]), dot8(x, y[1])]
}

/// `dot(x[r], y)` for eight rows, bit for bit, in one pass over y where AVX-512 allows.
#[inline]
pub fn dot8(x: [&[f32]; 8], y: &[f32]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the features were detected at run time.
        return unsafe { dot8_avx512(x, y) };
    }
    let a = dot4([x[0], x[1], x[2], x[3]], y);
    let b = dot4([x[4], x[5], x[6], x[7]], y);
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// Σ x[i]·w[i] for float32 x and half-precision weights w (bits of `h`), widened exactly and
/// accumulated in float32 as `dot` accumulates: sixteen lanes over 16-value chunks, summed by
/// `sum16`, then the last values one by one. The same bits on every machine and whichever
/// rows `dot_half_rows` computes beside it.
#[inline]
pub fn dot_half(x: &[f32], w: &[u16], h: Half) -> f32 {
    dot_half_rows(x, [w], h)[0]
}

/// `dot_half` of x with R weight rows at once: each chunk of x is loaded once for all R.
#[inline]
pub fn dot_half_rows<const R: usize>(x: &[f32], w: [&[u16]; R], h: Half) -> [f32; R] {
    dot_widened::<R, ROW_CHUNKS>(x, w, h)
}

/// `dot_half_rows` of x with the four rows of one group of a grouped matrix
/// (`model::dtype::grouped_index`: chunk c of row r at group[(4c + r)·16..]), bit for bit:
/// the same sums, read as one sequential stream. x's length must be a multiple of 16.
#[inline]
pub fn dot_half_group(x: &[f32], group: &[u16], h: Half) -> [f32; 4] {
    let n = x.len();
    assert!(
        n.is_multiple_of(16) && group.len() == 4 * n,
        "dot_half_group: {} values for four rows of {n}",
        group.len()
    );
    let rows: [&[u16]; 4] = std::array::from_fn(|r| &group[16 * r..]);
    dot_widened::<4, GROUP_CHUNKS>(x, rows, h)
}

/// Values between the starts of a row's consecutive 16-value chunks: rows of their own, and
/// rows interleaved in groups of four (`dot_half_group`).
const ROW_CHUNKS: usize = 16;
const GROUP_CHUNKS: usize = 64;

/// Σ x[i]·w[r][i] over rows whose chunk c starts at w[r][c·STRIDE] (x's chunk c at x[16c]),
/// accumulated as `dot_half` does; with STRIDE 64 the rows' slices run on past their own
/// values and x's length bounds the sums (a whole number of chunks).
#[inline]
fn dot_widened<const R: usize, const STRIDE: usize>(
    x: &[f32],
    w: [&[u16]; R],
    h: Half,
) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the features were detected at run time.
        return unsafe {
            match h {
                Half::Bf16 => dot_widened_avx512::<true, R, STRIDE>(x, w),
                Half::F16 => dot_widened_avx512::<false, R, STRIDE>(x, w),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() {
        // SAFETY: the features were detected at run time.
        return unsafe {
            match h {
                Half::Bf16 => dot_widened_avx2::<true, R, STRIDE>(x, w),
                Half::F16 => dot_widened_avx2::<false, R, STRIDE>(x, w),
            }
        };
    }
    dot_widened_body::<R, STRIDE>(x, w, h)
}

/// The number of values the sums of `dot_widened` cover (the common length of x and the rows;
/// x's for interleaved rows) and their whole 16-value chunks.
fn widened_len<const R: usize, const STRIDE: usize>(x: &[f32], w: &[&[u16]; R]) -> (usize, usize) {
    let n = if STRIDE == ROW_CHUNKS {
        w.iter().fold(x.len(), |n, r| n.min(r.len()))
    } else {
        let n = x.len();
        assert!(
            n.is_multiple_of(16) && w.iter().all(|r| r.len() >= (n / 16 - 1) * STRIDE + 16),
            "interleaved rows: sizes"
        );
        n
    };
    (n, n / 16)
}

/// Common length of x and the rows, its whole 16-value chunks, and the scalar tail of row r
/// added to its lane sum.
fn widened_tail(x: &[f32], w: &[u16], h: Half, from: usize, n: usize, mut sum: f32) -> f32 {
    for i in from..n {
        sum += x[i] * h.widen(w[i]);
    }
    sum
}

fn dot_widened_body<const R: usize, const STRIDE: usize>(
    x: &[f32],
    w: [&[u16]; R],
    h: Half,
) -> [f32; R] {
    let (n, chunks) = widened_len::<R, STRIDE>(x, &w);
    let mut acc = [[0.0f32; 16]; R];
    for c in 0..chunks {
        for (a, row) in acc.iter_mut().zip(&w) {
            for (lane, s) in a.iter_mut().enumerate() {
                *s = x[c * 16 + lane].mul_add(h.widen(row[c * STRIDE + lane]), *s);
            }
        }
    }
    std::array::from_fn(|r| widened_tail(x, w[r], h, chunks * 16, n, sum16(acc[r])))
}

/// Eight half-precision values at `$p` (bfloat16 bits when `$bf16`, else float16) widened
/// exactly into a 256-bit float32 vector. A macro rather than a helper function: a nested
/// function would not inherit its caller's target features (AVX2, F16C), and its intrinsics
/// would become calls.
#[cfg(target_arch = "x86_64")]
macro_rules! widen8 {
    ($p:expr, $bf16:expr) => {{
        let bits = _mm_loadu_si128($p as *const __m128i);
        if $bf16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
        } else {
            _mm256_cvtph_ps(bits)
        }
    }};
}

/// dst[(c − c_range.start)·rows + r] = src[r·cols + c] for the columns `c_range` of a
/// [rows, cols] matrix, float32 or half-precision bits (row-major or grouped) widened
/// exactly: those columns transposed, in 8 × 8 blocks (whole cache lines read and written; AVX
/// shuffles where the CPU has AVX2 and F16C).
pub fn transpose_cols(
    src: Matrix,
    rows: usize,
    cols: usize,
    c_range: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    let (c_start, width) = (c_range.start, c_range.len());
    assert!(
        src.len() >= rows * cols && c_range.end <= cols && dst.len() >= rows * width,
        "transpose: sizes"
    );
    let (r8, w8) = (rows / 8 * 8, width / 8 * 8);
    // A grouped matrix's eight values of a row are contiguous when they do not cross a chunk.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let fast = has_avx2_f16c() && !matches!(src, Matrix::Grouped(..) if c_start % 8 != 0);
    for r0 in (0..r8).step_by(8) {
        for c0 in (0..w8).step_by(8) {
            #[cfg(target_arch = "x86_64")]
            if fast {
                let at: [usize; 8] =
                    std::array::from_fn(|i| src.position((r0 + i) * cols + c_start + c0));
                let to = &mut dst[c0 * rows + r0..];
                // SAFETY: AVX2 and F16C were detected; the block's 8 rows of 8 values lie
                // inside src (r0 + 8 <= rows, c_start + c0 + 8 <= cols; a grouped matrix's
                // eight stay inside one chunk), their transpose inside dst (8 rows of `rows`
                // from c0 · rows + r0).
                unsafe {
                    match src {
                        Matrix::F32(v) => {
                            transpose8_avx::<0>(at.map(|a| v[a..].as_ptr().cast()), to, rows)
                        }
                        Matrix::Half(v, Half::Bf16) | Matrix::Grouped(v, Half::Bf16, _) => {
                            transpose8_avx::<1>(at.map(|a| v[a..].as_ptr().cast()), to, rows)
                        }
                        Matrix::Half(v, Half::F16) | Matrix::Grouped(v, Half::F16, _) => {
                            transpose8_avx::<2>(at.map(|a| v[a..].as_ptr().cast()), to, rows)
                        }
                    }
                };
                continue;
            }
            for r in r0..r0 + 8 {
                for c in c0..c0 + 8 {
                    dst[c * rows + r] = src.value(r * cols + c_start + c);
                }
            }
        }
    }
    // The ragged right columns and bottom rows.
    for r in 0..rows {
        let from = if r < r8 { w8 } else { 0 };
        for c in from..width {
            dst[c * rows + r] = src.value(r * cols + c_start + c);
        }
    }
}

/// One 8 × 8 block of `transpose_cols`: 8 values from each of the 8 rows at `s` (float32 for
/// KIND 0, bfloat16 bits for 1, float16 bits for 2) into 8 rows of `d` (row stride `rows`),
/// in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8_avx<const KIND: u8>(s: [*const u8; 8], d: &mut [f32], rows: usize) {
    use std::arch::x86_64::*;
    debug_assert!(d.len() >= 7 * rows + 8);
    let load = |i: usize| -> __m256 {
        match KIND {
            0 => _mm256_loadu_ps(s[i] as *const f32),
            _ => widen8!(s[i] as *const u16, KIND == 1),
        }
    };
    let r: [__m256; 8] = std::array::from_fn(load);
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (i, v) in out.iter().enumerate() {
        _mm256_storeu_ps(d.as_mut_ptr().add(i * rows), *v);
    }
}

/// out[c] += Σ_j p[j] · widen(rows[j·n + c]) for half-precision rows [p.len(), n] (bits of
/// `h`, n = out.len()), each column summed in row order: the bits of `axpy` of each widened row
/// in turn. Attention's weighted sum of a half-precision KV cache's values: 64 columns at a time
/// stay in registers while the rows stream past, instead of out being loaded and stored per row.
pub fn weighted_rows_half(out: &mut [f32], p: &[f32], rows: &[u16], h: Half) {
    assert!(
        rows.len() >= p.len() * out.len(),
        "weighted_rows_half: rows"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() {
        // SAFETY: the features were detected at run time; rows holds p.len() rows of n.
        return unsafe {
            match h {
                Half::Bf16 => weighted_rows_half_avx2::<true>(out, p, rows),
                Half::F16 => weighted_rows_half_avx2::<false>(out, p, rows),
            }
        };
    }
    let n = out.len();
    for (j, &pj) in p.iter().enumerate() {
        for (o, &b) in out.iter_mut().zip(&rows[j * n..(j + 1) * n]) {
            *o += pj * h.widen(b);
        }
    }
}

/// `weighted_rows_half` with fused multiply-adds, eight 256-bit accumulators per 64 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_rows_half_avx2<const BF16: bool>(out: &mut [f32], p: &[f32], rows: &[u16]) {
    use std::arch::x86_64::*;
    // Columns c0.. in B blocks of eight, their sums in registers over all rows.
    macro_rules! columns {
        ($c0:expr, $b:literal) => {{
            let (c0, n, o) = ($c0, out.len(), out.as_mut_ptr());
            let mut acc = [_mm256_setzero_ps(); $b];
            for (b, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(o.add(c0 + 8 * b));
            }
            for (j, &pj) in p.iter().enumerate() {
                let (pv, row) = (_mm256_set1_ps(pj), rows.as_ptr().add(j * n + c0));
                for (b, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, widen8!(row.add(8 * b), BF16), *a);
                }
            }
            for (b, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(c0 + 8 * b), *a);
            }
        }};
    }
    let n = out.len();
    let mut c0 = 0;
    while c0 + 64 <= n {
        columns!(c0, 8);
        c0 += 64;
    }
    while c0 + 8 <= n {
        columns!(c0, 1);
        c0 += 8;
    }
    let h = if BF16 { Half::Bf16 } else { Half::F16 };
    for c in c0..n {
        for (j, &pj) in p.iter().enumerate() {
            out[c] = h.widen(rows[j * n + c]).mul_add(pj, out[c]);
        }
    }
}

/// `dot_widened_body` with each row's sixteen lanes in two 256-bit registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_widened_avx2<const BF16: bool, const R: usize, const STRIDE: usize>(
    x: &[f32],
    w: [&[u16]; R],
) -> [f32; R] {
    use std::arch::x86_64::*;
    let (n, chunks) = widened_len::<R, STRIDE>(x, &w);
    let ahead = half_prefetch_distance(R, n);
    let (xp, wp) = (x.as_ptr(), w.map(|r| r.as_ptr()));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for c in 0..chunks {
        let (at, wat) = (c * 16, c * STRIDE);
        // SAFETY: at + 16 <= n and wat + 16 <= each row's length (`widened_len`).
        let (x_lo, x_hi) = (_mm256_loadu_ps(xp.add(at)), _mm256_loadu_ps(xp.add(at + 8)));
        for r in 0..R {
            if prefetches_row::<STRIDE>(r) {
                _mm_prefetch::<_MM_HINT_T0>(wp[r].wrapping_add(ahead + wat) as *const i8);
            }
            acc[r][0] = _mm256_fmadd_ps(x_lo, widen8!(wp[r].add(wat), BF16), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x_hi, widen8!(wp[r].add(wat + 8), BF16), acc[r][1]);
        }
    }
    let h = if BF16 { Half::Bf16 } else { Half::F16 };
    std::array::from_fn(|r| {
        let mut lanes = [0.0f32; 16];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][1]);
        widened_tail(x, w[r], h, chunks * 16, n, sum16(lanes))
    })
}

/// How far ahead of the values being multiplied the streaming kernels prefetch weights, in
/// values (8 KB): the rows of a weight matrix are one contiguous stream, read faster than the
/// hardware prefetcher ramps up on its own within each 4 KB page.
const PREFETCH_AHEAD: usize = 2048;
/// How far ahead the half-precision kernels prefetch, in values, for R rows of n values: the
/// same place R rows further on, which is where the next call over a matrix's rows reads (its
/// rows are one contiguous stream, consumed R rows at a time). A fixed distance leaves holes
/// when it is not a multiple of R rows (8 KB against GPT-3 Small's 6 KB of four half rows
/// missed a third of each), and prefetching every 32-byte chunk rather than every other one
/// measured faster too: together, bfloat16 decode of GPT-3 Small went from 77 – 80 to 82 – 84
/// tokens/s on the machine of docs/performance.md.
fn half_prefetch_distance(rows: usize, n: usize) -> usize {
    rows * n
}

/// Whether the half-precision kernels prefetch for row r at each chunk: every row of its own
/// (every 32 bytes, measured faster than every 64), but of interleaved rows, whose chunks
/// share cache lines two by two, rows 0 and 2 (one prefetch per line: 2 – 4 % faster in a
/// scratch harness on AMD EPYC).
#[inline(always)]
fn prefetches_row<const STRIDE: usize>(r: usize) -> bool {
    STRIDE == ROW_CHUNKS || r.is_multiple_of(2)
}

/// `dot_widened_body` with each row's sixteen lanes in one 512-bit register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_widened_avx512<const BF16: bool, const R: usize, const STRIDE: usize>(
    x: &[f32],
    w: [&[u16]; R],
) -> [f32; R] {
    use std::arch::x86_64::*;
    // A macro, as `widen8`.
    macro_rules! widen16 {
        ($p:expr) => {{
            let bits = _mm256_loadu_si256($p as *const __m256i);
            if BF16 {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
            } else {
                _mm512_cvtph_ps(bits)
            }
        }};
    }
    let (n, chunks) = widened_len::<R, STRIDE>(x, &w);
    let ahead = half_prefetch_distance(R, n);
    let (xp, wp) = (x.as_ptr(), w.map(|r| r.as_ptr()));
    let mut acc = [_mm512_setzero_ps(); R];
    for c in 0..chunks {
        let (at, wat) = (c * 16, c * STRIDE);
        // SAFETY: at + 16 <= n and wat + 16 <= each row's length (`widened_len`).
        let xv = _mm512_loadu_ps(xp.add(at));
        for r in 0..R {
            if prefetches_row::<STRIDE>(r) {
                _mm_prefetch::<_MM_HINT_T0>(wp[r].wrapping_add(ahead + wat) as *const i8);
            }
            acc[r] = _mm512_fmadd_ps(xv, widen16!(wp[r].add(wat)), acc[r]);
        }
    }
    let h = if BF16 { Half::Bf16 } else { Half::F16 };
    std::array::from_fn(|r| widened_tail(x, w[r], h, chunks * 16, n, sum16_avx512(acc[r])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_any_shape() {
        for (rows, cols) in [
            (1, 1),
            (3, 5),
            (8, 8),
            (16, 24),
            (19, 13),
            (64, 37),
            (9, 130),
            (19, 32),
            (21, 48),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let halves = [Half::Bf16, Half::F16].map(|h| {
                let bits: Vec<u16> = src.iter().map(|&v| h.narrow(v * 0.37 - 3.0)).collect();
                let grouped = crate::model::dtype::grouped(&bits, cols);
                (h, bits, grouped)
            });
            for c_range in [0..cols, 16..cols, cols / 3..cols, 1..cols.min(10)] {
                if c_range.is_empty() {
                    continue;
                }
                let width = c_range.len();
                // Each source with the row-major matrix its values must match.
                let sources = [(Matrix::F32(&src), Matrix::F32(&src), "f32")]
                    .into_iter()
                    .chain(halves.iter().flat_map(|(h, b, g)| {
                        let rows = Matrix::Half(b, *h);
                        let grouped = (cols % 16 == 0)
                            .then(|| (Matrix::Grouped(g, *h, cols), rows, "grouped"));
                        [Some((rows, rows, "half")), grouped].into_iter().flatten()
                    }));
                for (m, row_major, what) in sources {
                    let mut dst = vec![f32::NAN; rows * width];
                    transpose_cols(m, rows, cols, c_range.clone(), &mut dst);
                    for r in 0..rows {
                        for c in c_range.clone() {
                            let want = row_major.value(r * cols + c);
                            let got = dst[(c - c_range.start) * rows + r];
                            assert_eq!(got, want, "{what} {rows}x{cols} at {r},{c}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn weighted_half_rows_are_axpy_of_each_widened_row() {
        for n in [5, 8, 64, 80, 128, 200] {
            let rows = 37;
            let p: Vec<f32> = (0..rows)
                .map(|j| ((j * 13 % 17) as f32 - 8.0) * 0.061)
                .collect();
            let start: Vec<f32> = (0..n).map(|c| (c % 7) as f32 * 0.5 - 1.0).collect();
            for h in [Half::Bf16, Half::F16] {
                let bits: Vec<u16> = (0..rows * n)
                    .map(|i| h.narrow(((i * 11 % 29) as f32 - 14.0) * 0.0771))
                    .collect();
                let mut want = start.clone();
                for (j, &pj) in p.iter().enumerate() {
                    let wide: Vec<f32> = bits[j * n..(j + 1) * n]
                        .iter()
                        .map(|&b| h.widen(b))
                        .collect();
                    axpy(&mut want, pj, &wide);
                }
                let mut got = start.clone();
                weighted_rows_half(&mut got, &p, &bits, h);
                let b = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(b(&got), b(&want), "{h:?}, {n} columns");
            }
        }
    }

    #[test]
    fn half_dots_are_the_same_bits_on_every_path() {
        for n in [0, 5, 16, 63, 64, 200, 768] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7 % 19) as f32 - 9.0) * 0.173)
                .collect();
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|r| {
                    (0..n)
                        .map(|i| ((i * 5 + r) % 23) as f32 * 0.0917 - 1.0)
                        .collect()
                })
                .collect();
            for h in [Half::Bf16, Half::F16] {
                let w: Vec<Vec<u16>> = rows
                    .iter()
                    .map(|r| r.iter().map(|&f| h.narrow(f)).collect())
                    .collect();
                let ws: [&[u16]; 4] = std::array::from_fn(|r| &w[r][..]);
                let four = dot_half_rows(&x, ws, h);
                let portable = dot_widened_body::<4, ROW_CHUNKS>(&x, ws, h);
                if n > 0 && n % 16 == 0 {
                    // The same rows interleaved as a group of a grouped matrix.
                    let group = crate::model::dtype::grouped(&w.concat(), n);
                    let bits = |v: [f32; 4]| v.map(f32::to_bits);
                    assert_eq!(
                        bits(dot_half_group(&x, &group, h)),
                        bits(four),
                        "n={n} group"
                    );
                    let gs: [&[u16]; 4] = std::array::from_fn(|r| &group[16 * r..]);
                    let body = dot_widened_body::<4, GROUP_CHUNKS>(&x, gs, h);
                    assert_eq!(bits(body), bits(four), "n={n} group, portable");
                }
                for r in 0..4 {
                    let exact: f64 = x
                        .iter()
                        .zip(&w[r])
                        .map(|(&a, &b)| a as f64 * h.widen(b) as f64)
                        .sum();
                    let one = dot_half(&x, &w[r], h);
                    assert_eq!(one.to_bits(), four[r].to_bits(), "n={n} row {r}");
                    assert_eq!(one.to_bits(), portable[r].to_bits(), "n={n} row {r}");
                    assert!((one as f64 - exact).abs() < 1e-4, "n={n}: {one} vs {exact}");
                }
                #[cfg(target_arch = "x86_64")]
                if has_avx2_f16c() {
                    // SAFETY: the features were detected.
                    let avx2 = unsafe {
                        match h {
                            Half::Bf16 => dot_widened_avx2::<true, 4, ROW_CHUNKS>(&x, ws),
                            Half::F16 => dot_widened_avx2::<false, 4, ROW_CHUNKS>(&x, ws),
                        }
                    };
                    assert_eq!(avx2.map(f32::to_bits), four.map(f32::to_bits), "n={n}");
                }
            }
        }
    }

    #[test]
    fn dot_and_axpy_agree_with_scalar_code() {
        let x: Vec<f32> = (0..101).map(|i| i as f32 * 0.5).collect();
        let y: Vec<f32> = (0..101).map(|i| 1.0 - i as f32 * 0.01).collect();
        let expect: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - expect).abs() < 1e-3);
        let mut z = y.clone();
        axpy(&mut z, 2.0, &x);
        for i in 0..101 {
            assert!((z[i] - (y[i] + 2.0 * x[i])).abs() < 1e-5);
        }
        let mut w = y.clone();
        axpy4(&mut w, [1.0, 2.0, -1.0, 0.5], [&x, &x, &y, &y]);
        for i in 0..101 {
            assert!((w[i] - (y[i] + 3.0 * x[i] - 0.5 * y[i])).abs() < 1e-3);
        }
    }

    /// Batched decoding relies on it: a row's dot product is the same bits with or without
    /// three other rows beside it, for lengths with and without a tail.
    #[test]
    fn dot_rows_are_single_dots_bit_for_bit() {
        for n in [0, 7, 16, 100, 768] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7 % 19) as f32 - 9.0) * 0.173)
                .collect();
            let w: Vec<Vec<f32>> = (0..4)
                .map(|r| {
                    (0..n)
                        .map(|i| ((i * 5 + r) % 23) as f32 * 0.0917 - 1.0)
                        .collect()
                })
                .collect();
            let four = dot_rows(&x, std::array::from_fn::<_, 4, _>(|r| &w[r][..]));
            for r in 0..4 {
                assert_eq!(four[r].to_bits(), dot(&x, &w[r]).to_bits(), "n={n} row {r}");
            }
        }
    }

    #[test]
    fn dot4_and_dot8_are_single_dots_bit_for_bit() {
        for n in [0, 5, 16, 101, 768] {
            let y: Vec<f32> = (0..n)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.013)
                .collect();
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|r| {
                    (0..n)
                        .map(|i| ((i * (r + 3) % 53) as f32 - 26.0) * 0.07)
                        .collect()
                })
                .collect();
            let got = dot4([&rows[0], &rows[1], &rows[2], &rows[3]], &y);
            for r in 0..4 {
                assert_eq!(
                    got[r].to_bits(),
                    dot(&rows[r], &y).to_bits(),
                    "n {n} row {r}"
                );
            }
        }
    }

    /// The eight-row and two-weight-row kernels (whichever this CPU runs, and the AVX2 one
    /// directly) against one `dot` per pair, on lengths with and without a tail of fewer
    /// than sixteen.
    #[test]
    fn batched_kernels_are_single_dots_bit_for_bit() {
        for n in [0, 1, 5, 15, 16, 17, 31, 33, 101, 768, 768 + 5] {
            let vec = |seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * (seed + 3) % 53) as f32 - 26.0) * (0.07 + seed as f32 * 0.001))
                    .collect()
            };
            let rows: Vec<Vec<f32>> = (0..8).map(vec).collect();
            let ys = [vec(11), vec(12)];
            let x8: [&[f32]; 8] = std::array::from_fn(|r| &rows[r][..]);
            let y2 = [&ys[0][..], &ys[1][..]];
            // got[r] must be dot(x[r], y[w]) for each row r.
            let check = |what: &str, got: &[f32], w: usize| {
                for (r, g) in got.iter().enumerate() {
                    let want = dot(&rows[r], &ys[w]).to_bits();
                    assert_eq!(g.to_bits(), want, "{what} n {n} row {r} y {w}");
                }
            };
            check("dot8", &dot8(x8, &ys[0]), 0);
            for (w, got) in dot8x2(x8, y2, &ys[0]).iter().enumerate() {
                check("dot8x2", got, w);
            }
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the features were detected at run time.
                let got = unsafe { dot4x2_avx2([x8[0], x8[1], x8[2], x8[3]], y2, [&[], &ys[1]]) };
                for (w, got) in got.iter().enumerate() {
                    check("dot4x2", got, w);
                }
            }
        }
    }
}

/// e^x for float32 within about 2 ulp (Cephes' polynomial after range reduction to
/// [−ln2/2, ln2/2]), written without branches so the compiler vectorises it.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN_ARG: f32 = -87.3;
    let x_in = x;
    // Adding 1.5·2^23 rounds x·log2(e) to an integer held in the sum's low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(MIN_ARG, 88.0);
    let shifted = x * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // Scale by 2^n through the exponent bits (n is within the normal range after the clamp),
    // taking n from the bits of `shifted`: a float-to-int cast must saturate, which LLVM does
    // one lane at a time.
    let n_bits = shifted.to_bits().wrapping_sub(SHIFTER.to_bits());
    let e = f32::from_bits(n_bits.wrapping_add(127) << 23) * y;
    // Below the clamp the true value is under 1.2e-38: flush it to zero rather than return
    // e^−87.3, which gives a score far below its row's maximum (or one that overflowed to −∞)
    // a probability of 1e-38, wrong by whole units once it weights a value near 1e38.
    // A select, so the loop stays vectorised.
    if x_in < MIN_ARG {
        0.0
    } else {
        e
    }
}

/// Σ f(v) over x in eight independent partial sums, so that the compiler can vectorise it (a
/// single running sum is a chain of dependent additions).
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Σ f(v) over x in float64, in eight independent partial sums: for statistics of float32 data
/// whose sums or squares overflow float32 (values near ±3.4e38 square to 1e77).
#[inline(always)]
pub fn sum_map_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Σ v² in float64 (vectorised): the squared L2 norm of a gradient block.
pub fn sum_squares_f64(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(x: &[f32]) -> f64 {
        sum_map_f64(x, |v| v * v)
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { avx2(x) };
    }
    sum_map_f64(x, |v| v * v)
}

/// The largest value of x (−∞ when empty), in eight independent lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
fn softmax_body(x: &mut [f32], scale: f32) -> f32 {
    // scale > 0, so max(x · scale) = max(x) · scale exactly (rounding is monotonic).
    let top = max(x) * scale;
    x.iter_mut().for_each(|v| *v = exp_approx(*v * scale - top));
    let sum = sum_map(x, |v| v);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
    top + sum.ln()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32], scale: f32) -> f32 {
    softmax_body(x, scale)
}

/// x ← softmax(x · scale) for a non-empty row and a positive scale; returns the row's
/// log-sum-exp log Σ e^{x·scale}.
pub fn softmax_scaled_inplace(x: &mut [f32], scale: f32) -> f32 {
    debug_assert!(!x.is_empty() && scale > 0.0);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { softmax_avx2(x, scale) };
    }
    softmax_body(x, scale)
}

/// GPT-2's tanh-approximated GELU with tanh(u) = 1 − 2 / (e^{2u} + 1), vectorisable.
#[inline(always)]
fn gelu_body(x: &mut [f32]) {
    const K: f32 = 0.797_884_6; // √(2/π)
    x.iter_mut().for_each(|v| {
        let u = K * (*v + 0.044_715 * *v * *v * *v);
        let t = 1.0 - 2.0 / (exp_approx(2.0 * u) + 1.0);
        *v = 0.5 * *v * (1.0 + t);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: &mut [f32]) {
    gelu_body(x)
}

/// x ← gelu_new(x) element-wise (vectorised).
pub fn gelu_new_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { gelu_avx2(x) };
    }
    gelu_body(x)
}

/// x ← e^{x − shift} element-wise; returns Σ of the new values, accumulated in float64 (a row
/// of 50,257 probabilities summed in float32 lanes could lose 1e-4 of its total).
#[inline(always)]
fn exp_shifted_body(x: &mut [f32], shift: f32) -> f64 {
    x.iter_mut().for_each(|v| *v = exp_approx(*v - shift));
    sum_map_f64(x, |v| v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: &mut [f32], shift: f32) -> f64 {
    exp_shifted_body(x, shift)
}

/// x ← e^{x − shift} (vectorised), returning the sum of the results. With shift = max(x),
/// the unnormalised softmax of a row of logits and its normaliser.
pub fn exp_shifted_inplace(x: &mut [f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { exp_shifted_avx2(x, shift) };
    }
    exp_shifted_body(x, shift)
}

/// g ← g · gelu_new′(x). With e = e^{2u} (u the tanh argument), r = 1/(1 + e) and
/// s = e·r, 1 + tanh u = 2s and 1 − tanh² u = 4sr: no difference of nearly equal numbers, so
/// the far negative tail (gelu′(−5) ≈ −1e-6) keeps its digits.
#[inline(always)]
fn gelu_grad_body(g: &mut [f32], x: &[f32]) {
    const K: f32 = 0.797_884_6; // √(2/π)
    const C: f32 = 0.044_715;
    for (g, &v) in g.iter_mut().zip(x) {
        // Beyond ±9 the derivative is 1 or 0 to float32 precision; clamping keeps e finite
        // and v³ from overflowing (NaN passes through).
        let v = v.clamp(-9.0, 9.0);
        let u = K * (v + C * v * v * v);
        let e = exp_approx(2.0 * u);
        let r = 1.0 / (1.0 + e);
        let s = e * r;
        let du = K * (1.0 + 3.0 * C * v * v);
        *g *= s + 2.0 * v * du * s * r;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_grad_avx2(g: &mut [f32], x: &[f32]) {
    gelu_grad_body(g, x)
}

/// g ← g · gelu_new′(x) element-wise (vectorised): the backward of `gelu_new_inplace`.
pub fn mul_gelu_new_grad(g: &mut [f32], x: &[f32]) {
    assert_eq!(g.len(), x.len(), "gradient and input of different lengths");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { gelu_grad_avx2(g, x) };
    }
    gelu_grad_body(g, x)
}

#[cfg(test)]
mod approx_tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp() {
        let xs: Vec<f32> = (-8000..8000).map(|i| i as f32 * 0.01).collect();
        let ys: Vec<f32> = xs.iter().map(|&x| exp_approx(x)).collect();
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp();
            assert!(
                ((*y as f64 - want) / want).abs() < 3e-7,
                "exp({x}) = {y}, want {want}"
            );
        }
        let (tiny, huge) = (exp_approx(-87.0), exp_approx(200.0));
        assert!((1e-38..1e-37).contains(&tiny) && huge.is_finite());
        assert_eq!(exp_approx(-200.0), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let xs: Vec<f32> = (-1000..1000).map(|i| i as f32 * 0.01).collect();
        let mut ys = xs.clone();
        gelu_new_inplace(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let x = *x as f64;
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!(
                (*y as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_grad_matches_the_float64_derivative() {
        let xs: Vec<f32> = (-1200..1200).map(|i| i as f32 * 0.01).collect();
        let mut g = vec![2.0f32; xs.len()];
        mul_gelu_new_grad(&mut g, &xs);
        for (x, g) in xs.iter().zip(&g) {
            let want = 2.0 * crate::kernels::elementwise::gelu_new_grad(*x as f64);
            assert!(
                (*g as f64 - want).abs() < 2e-6,
                "2·gelu'({x}) = {g}, want {want}"
            );
        }
        let mut far = [1.0f32; 4];
        mul_gelu_new_grad(&mut far, &[-1e30, -50.0, 50.0, 1e30]);
        assert!(far[0].abs() < 1e-20 && far[1].abs() < 1e-20 && far[2] == 1.0 && far[3] == 1.0);
    }

    #[test]
    fn shifted_exp_and_its_sum() {
        let xs: Vec<f32> = (0..50_257)
            .map(|i| ((i * 7919 % 1000) as f32) * 0.02)
            .collect();
        let top = max(&xs);
        let mut e = xs.clone();
        let sum = exp_shifted_inplace(&mut e, top);
        let want: f64 = xs.iter().map(|&v| (v as f64 - top as f64).exp()).sum();
        assert!((sum / want - 1.0).abs() < 1e-6, "{sum} vs {want}");
        for (x, e) in xs.iter().zip(&e) {
            // The argument is the float32 difference, as in any float32 softmax.
            let want = ((*x - top) as f64).exp();
            assert!((*e as f64 - want).abs() <= 3e-7 * want);
        }
    }

    #[test]
    fn lane_reductions_and_softmax() {
        let xs: Vec<f32> = (0..101)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
            .collect();
        let naive_sum: f64 = xs.iter().map(|&v| (v * v) as f64).sum();
        assert!((sum_map(&xs, |v| v * v) as f64 - naive_sum).abs() < 1e-3);
        let huge = [3e38f32; 11];
        let want = 11.0 * (3e38f32 as f64).powi(2);
        assert!((sum_map_f64(&huge, |v| v * v) / want - 1.0).abs() < 1e-15);
        assert_eq!(max(&xs), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut p = xs.clone();
        let lse = softmax_scaled_inplace(&mut p, 0.5);
        let z: f64 = xs.iter().map(|&v| (0.5 * v as f64).exp()).sum();
        assert!((lse as f64 - z.ln()).abs() < 1e-5);
        for (x, p) in xs.iter().zip(&p) {
            assert!((*p as f64 - (0.5 * *x as f64).exp() / z).abs() < 1e-6);
        }
    }
}
