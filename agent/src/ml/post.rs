//! Score post-transforms shared by the ONNX-ML operators, computed as onnxruntime computes them.

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Post {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

impl Post {
    pub fn parse(node: &NodeProto) -> TractResult<Post> {
        Ok(match node.get_attr_opt::<&str>("post_transform")?.unwrap_or("NONE") {
            "NONE" => Post::None,
            "LOGISTIC" => Post::Logistic,
            "SOFTMAX" => Post::Softmax,
            "SOFTMAX_ZERO" => Post::SoftmaxZero,
            "PROBIT" => Post::Probit,
            other => bail!("node {:?}: unknown post_transform {other:?}", node.name),
        })
    }

    /// Apply to one row of scores.
    pub fn apply(self, s: &mut [f32]) {
        match self {
            Post::None => {}
            Post::Probit => s.iter_mut().for_each(|v| *v = probit(*v)),
            Post::Logistic => s.iter_mut().for_each(|v| *v = logistic(*v)),
            Post::Softmax => {
                let max = s.iter().copied().fold(-f32::MAX, f32::max);
                s.iter_mut().for_each(|v| *v = (*v - max).exp());
                let sum: f32 = s.iter().sum();
                s.iter_mut().for_each(|v| *v /= sum);
            }
            Post::SoftmaxZero => {
                // Zero scores stay (nearly) zero: exp(0) would not.
                let max = s.iter().copied().fold(-f32::MAX, f32::max);
                let scale = (-max).exp();
                let mut sum = 0.0;
                for v in s.iter_mut() {
                    if *v > 1e-7 || *v < -1e-7 {
                        *v = (*v - max).exp();
                        sum += *v;
                    } else {
                        *v *= scale;
                    }
                }
                s.iter_mut().for_each(|v| *v /= sum);
            }
        }
    }
}

/// `e^v` for every value, in a loop the compiler vectorises (`f32::exp` is one library call
/// a value): Cephes' single-precision method, the power of two split off by rounding, then a
/// degree-5 polynomial. Within 1 ulp of the exact value from -86.9 to 88.7; below about -87
/// it gives 0 (the exact value is under 1.7e-38), above 88.72 infinity; NaN gives NaN.
pub fn exp_in_place(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = exp(*v);
    }
}

#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that n·ln 2 is taken off exactly.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then taking 1.5·2^23 rounds to the nearest integer, in any vector unit.
    const ROUND: f32 = 12_582_912.0;
    let over = x > 88.72284;
    let under = x < -87.33654;
    let c = x.clamp(-87.33654, 88.72284);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n as 2^(n - 1) · 2, so that n = 128 stays finite; n = -126 gives 0. n, from -126 to
    // 128, is in the low bits of `t` (no conversion, which would not vectorise).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(126) << 23);
    // Doubled before scaling: a power of two then scales exactly wherever the result is normal.
    let y = (e * 2.0) * scale;
    if over {
        f32::INFINITY
    } else if under {
        0.0
    } else {
        y
    }
}

pub fn logistic(v: f32) -> f32 {
    let e = 1.0 / (1.0 + (-v.abs()).exp());
    if v < 0.0 {
        1.0 - e
    } else {
        e
    }
}

/// sqrt(2) * erfinv(2p - 1), with onnxruntime's erfinv approximation (Winitzki, a = 0.147).
pub fn probit(p: f32) -> f32 {
    let x = p * 2.0 - 1.0;
    let sgn = if x < 0.0 { -1.0 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let log = x.ln();
    let v = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147 * log;
    let v3 = -v + (v * v - v2).sqrt();
    std::f32::consts::SQRT_2 * sgn * v3.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms() {
        let mut s = [1.0, 2.0, 3.0];
        Post::Softmax.apply(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6 && s[2] > s[1]);
        let mut z = [0.0, 2.0, 0.0];
        Post::SoftmaxZero.apply(&mut z);
        assert!(z[0] < 1e-6 && (z[1] - 1.0).abs() < 1e-6);
        assert!((logistic(0.0) - 0.5).abs() < 1e-7);
        assert!((logistic(-3.0) + logistic(3.0) - 1.0).abs() < 1e-6);
        // probit(0.975) is about 1.96.
        assert!((probit(0.975) - 1.96).abs() < 0.01, "{}", probit(0.975));
    }

    /// The vectorised exponential is within 1 ulp of the exact value over its whole normal
    /// range (from -86.9 to 88.7 in steps of 1/1024, and near zero), and gives 0, infinity and
    /// NaN at the ends.
    #[test]
    fn exp_is_within_one_ulp() {
        let mut xs: Vec<f32> = (0..180_000)
            .map(|i| -86.9 + i as f32 / 1024.0)
            .filter(|x| *x < 88.7)
            .collect();
        xs.extend((0..40).flat_map(|e| [1.0f32, -1.0].map(|s| s * 2f32.powi(-e) * 1.37)));
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (x, y) in xs.iter().zip(&got) {
            let exact = (*x as f64).exp() as f32;
            let ulps = (y.to_bits() as i64 - exact.to_bits() as i64).abs();
            assert!(ulps <= 1, "exp({x}) = {y}, exactly {exact}");
        }
        let mut ends = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 89.0, -88.0, 0.0, -0.0];
        exp_in_place(&mut ends);
        assert!(ends[0].is_nan());
        assert_eq!(ends[1..], [f32::INFINITY, 0.0, f32::INFINITY, 0.0, 1.0, 1.0]);
    }
}
