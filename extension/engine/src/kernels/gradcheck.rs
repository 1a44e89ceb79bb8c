//! Finite-difference gradient checking shared by the kernel tests.

/// Compares an analytic gradient with central differences of the scalar function `f` at `x`.
/// `f` is evaluated in float64 from float32 kernels, so the tolerance is loose but meaningful.
pub fn assert_grad_matches(x: &[f32], analytic: &[f32], f: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "gradient length");
    let mut probe = x.to_vec();
    for i in 0..x.len() {
        let h = 1e-2f32.max(x[i].abs() * 1e-2);
        probe[i] = x[i] + h;
        let up = f(&probe);
        probe[i] = x[i] - h;
        let down = f(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * (h as f64));
        let a = analytic[i] as f64;
        assert!(
            close(numeric, a),
            "gradient mismatch at {i}: analytic {a}, finite difference {numeric}"
        );
    }
}

fn close(numeric: f64, analytic: f64) -> bool {
    (numeric - analytic).abs() <= 2e-3 + 2e-2 * numeric.abs().max(analytic.abs())
}

/// For piecewise-smooth, strongly curved functions (a model with ReLUs): the analytic
/// gradient must match the central difference extrapolated to zero step (Richardson: the
/// h² error term cancels), or, where a kink lies within the step, one of the narrow one-sided
/// differences (step h/8) that does not straddle it.
pub fn assert_grad_matches_piecewise(x: &[f32], analytic: &[f32], f: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "gradient length");
    let mut probe = x.to_vec();
    let at = f(x);
    let mut at_offset = |i: usize, h: f32| {
        probe[i] = x[i] + h;
        let v = f(&probe);
        probe[i] = x[i];
        v
    };
    for i in 0..x.len() {
        let h = 1e-2f32.max(x[i].abs() * 1e-2);
        let (up, down) = (at_offset(i, h), at_offset(i, -h));
        let a = analytic[i] as f64;
        if close((up - down) / (2.0 * h as f64), a) {
            continue; // the plain central difference agrees: no need to look closer
        }
        let (up2, down2) = (at_offset(i, h / 2.0), at_offset(i, -h / 2.0));
        let (up8, down8) = (at_offset(i, h / 8.0), at_offset(i, -h / 8.0));
        let hd = h as f64;
        let central = (up - down) / (2.0 * hd);
        let central_half = (up2 - down2) / hd;
        let differences = [
            (4.0 * central_half - central) / 3.0,
            (up8 - at) * 8.0 / hd,
            (at - down8) * 8.0 / hd,
        ];
        assert!(
            differences.iter().any(|&d| close(d, a)),
            "gradient mismatch at {i}: analytic {a}, differences (extrapolated, forward, backward) {differences:?}"
        );
    }
}
