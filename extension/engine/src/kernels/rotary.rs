//! Rotary position embedding (GPT-NeoX, GPT-J): the first `dims` dimensions of every head of
//! the queries and keys turn, pair by pair, by the angle position · base^(−2i/dims); the rest
//! pass through. Layout: a row holds n_head heads of d_head values each.

use crate::model::config::{ModelConfig, Rotary, RotaryPairing};

/// The frequencies of one rotary configuration.
pub struct RotaryTable {
    dims: usize,
    pairing: RotaryPairing,
    /// [dims/2]: base^(−2i/dims), in float32 as transformers computes it.
    inv_freq: Vec<f32>,
}

impl RotaryTable {
    pub fn new(r: &Rotary) -> Self {
        let inv_freq = (0..r.dims / 2)
            .map(|i| 1.0 / r.base.powf((2 * i) as f32 / r.dims as f32))
            .collect();
        Self {
            dims: r.dims,
            pairing: r.pairing,
            inv_freq,
        }
    }

    /// cos and sin [dims/2] of the angles at `pos`.
    fn angles(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = pos as f32 * f;
                (a.cos(), a.sin())
            })
            .unzip()
    }

    /// Turns every head of each row of `x` (rows of `width` values, the heads at `parts`
    /// offsets of each row, `n_head` heads of `d_head` each per part) by its position's
    /// angles; `sign` −1 turns back by the same angles (the gradient of the rotation).
    #[allow(clippy::too_many_arguments)]
    pub fn rotate_rows(
        &self,
        x: &mut [f32],
        width: usize,
        parts: &[usize],
        n_head: usize,
        d_head: usize,
        positions: &[usize],
        sign: f32,
    ) {
        for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
            let (cos, sin) = self.angles(pos);
            for &at in parts {
                for head in row[at..at + n_head * d_head].chunks_exact_mut(d_head) {
                    self.rotate_head(head, &cos, &sin, sign);
                }
            }
        }
    }

    /// Turns the queries and keys of every row of a fused q|k|v buffer [rows, 3·d_attn] of a
    /// `cfg` model by the row's position (`sign` as in `rotate_rows`); values stay as they are.
    pub fn rotate_qk(&self, qkv: &mut [f32], cfg: &ModelConfig, positions: &[usize], sign: f32) {
        let da = cfg.d_attn();
        self.rotate_rows(
            qkv,
            3 * da,
            &[0, da],
            cfg.n_head,
            cfg.d_head,
            positions,
            sign,
        );
    }

    fn rotate_head(&self, head: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
        let half = self.dims / 2;
        for i in 0..half {
            let (a, b) = match self.pairing {
                RotaryPairing::Halves => (i, i + half),
                RotaryPairing::Interleaved => (2 * i, 2 * i + 1),
            };
            let (x1, x2, c, s) = (head[a], head[b], cos[i], sign * sin[i]);
            head[a] = x1 * c - x2 * s;
            head[b] = x2 * c + x1 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairing: RotaryPairing) -> RotaryTable {
        RotaryTable::new(&Rotary {
            dims: 4,
            base: 10000.0,
            pairing,
        })
    }

    /// At position 0 nothing turns; the rotation keeps each pair's length, leaves the
    /// dimensions past `dims` alone, and turning back restores the input.
    #[test]
    fn rotation_properties() {
        for pairing in [RotaryPairing::Halves, RotaryPairing::Interleaved] {
            let t = table(pairing);
            let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y = x.clone();
            t.rotate_rows(&mut y, 12, &[0], 2, 6, &[0], 1.0);
            assert_eq!(x, y);
            t.rotate_rows(&mut y, 12, &[0], 2, 6, &[5], 1.0);
            let pairs: &[(usize, usize)] = match pairing {
                RotaryPairing::Halves => &[(0, 2), (1, 3)],
                RotaryPairing::Interleaved => &[(0, 1), (2, 3)],
            };
            for head in [0, 6] {
                for &(a, b) in pairs {
                    let len = |v: &[f32]| v[head + a].hypot(v[head + b]);
                    assert!((len(&x) - len(&y)).abs() < 1e-6);
                    assert_ne!(x[head + a], y[head + a]);
                }
                assert_eq!(x[head + 4..head + 6], y[head + 4..head + 6]);
            }
            t.rotate_rows(&mut y, 12, &[0], 2, 6, &[5], -1.0);
            let worst = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-6, "{worst}");
        }
    }

    /// The first pair turns by exactly the position (its frequency is 1).
    #[test]
    fn first_pair_turns_by_the_position() {
        let t = table(RotaryPairing::Halves);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        t.rotate_rows(&mut x, 4, &[0], 1, 4, &[2], 1.0);
        assert!((x[0] - 2f32.cos()).abs() < 1e-7 && (x[2] - 2f32.sin()).abs() < 1e-7);
    }
}
