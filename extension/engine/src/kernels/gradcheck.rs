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
        let tol = 2e-3 + 2e-2 * numeric.abs().max(a.abs());
        assert!(
            (numeric - a).abs() <= tol,
            "gradient mismatch at {i}: analytic {a}, finite difference {numeric}"
        );
    }
}
