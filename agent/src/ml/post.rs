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
}
