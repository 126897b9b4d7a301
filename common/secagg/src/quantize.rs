//! Fixed-point quantization into the ring of 32-bit integers, where masks are added.
//!
//! A value x is clipped to [−R, R] and becomes round(x·S) mod 2³², with S = ⌊(2³¹ − 1) / (n·R)⌋ for
//! at most n participants, so that any sum of n quantized values stays within (−2³¹, 2³¹) and
//! reads back exactly as a signed integer. Each value is off by at most 1/(2S) (plus what clipping
//! removed), so a sum of n values is off by at most n/(2S): [`Quantizer::sum_error_bound`].

use crate::Parameters;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    range: f32,
    scale: f64,
    /// The largest |q|: ⌊R·S⌋, so that n of them never wrap (rounding R·S up could).
    limit: i64,
}

impl Quantizer {
    pub fn new(parameters: &Parameters) -> Quantizer {
        let scale =
            ((f64::from(i32::MAX)) / (parameters.max_participants as f64 * f64::from(parameters.range))).floor();
        // `Parameters::validate` refuses n·R ≥ 2³¹ − 1, where the scale would fall below 1.
        let scale = scale.max(1.0);
        Quantizer { range: parameters.range, scale, limit: (f64::from(parameters.range) * scale).floor() as i64 }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `x` clipped to ±R, in the ring. NaN maps to 0: callers refuse non-finite inputs first
    /// (`ClientRound::masked_input`).
    pub fn quantize(&self, x: f32) -> u32 {
        let clipped = if x.is_nan() { 0.0 } else { x.clamp(-self.range, self.range) };
        ((f64::from(clipped) * self.scale).round() as i64).clamp(-self.limit, self.limit) as i32 as u32
    }

    /// How many of `values` clipping to ±R changes.
    pub fn clipped(&self, values: &[f32]) -> usize {
        values.iter().filter(|v| v.abs() > self.range).count()
    }

    /// A sum of quantized values (mod 2³²) back as a number.
    pub fn dequantize(&self, sum: u32) -> f64 {
        f64::from(sum as i32) / self.scale
    }

    /// The largest error of a dequantized sum of `n` unclipped values.
    pub fn sum_error_bound(&self, n: usize) -> f64 {
        n as f64 * 0.5 / self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantizer(max_participants: usize, range: f32) -> Quantizer {
        Quantizer::new(&Parameters { threshold: 2, degree: 2, range, max_participants })
    }

    #[test]
    fn a_sum_of_n_values_at_the_range_never_wraps() {
        // Check 1 of the review: n = 2 at range 0.5 and n = 1,000 at range 0.01 wrapped before.
        for (n, range) in [(2usize, 0.5f32), (1000, 0.01), (16, 2.0), (3, 7.3)] {
            let q = quantizer(n, range);
            let top = (0..n).fold(0u32, |sum, _| sum.wrapping_add(q.quantize(range)));
            let bottom = (0..n).fold(0u32, |sum, _| sum.wrapping_add(q.quantize(-range)));
            let want = n as f64 * f64::from(range);
            assert!((q.dequantize(top) - want).abs() <= q.sum_error_bound(n) + want * 1e-6, "{n} × {range}");
            assert!((q.dequantize(bottom) + want).abs() <= q.sum_error_bound(n) + want * 1e-6, "{n} × -{range}");
        }
    }

    #[test]
    fn parameters_whose_scale_falls_below_one_are_refused() {
        let parameters = Parameters { threshold: 2, degree: 2, range: 1e7, max_participants: 1000 };
        assert!(parameters.validate().unwrap_err().to_string().contains("2³¹"));
        assert_eq!(quantizer(4, 1.0).clipped(&[0.5, 1.5, -2.0, 1.0]), 2);
    }
}
