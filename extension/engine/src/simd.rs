//! Runtime CPU-feature dispatch for the few loops that the compiler vectorises well once it may
//! use AVX2 and FMA. The binary stays portable: the baseline path runs on any x86-64.

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

/// Σ x[i]·y[i] with eight independent accumulators so the loop vectorises.
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
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 16..n {
        sum += x[i] * y[i];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    dot_body::<true>(x, y)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
