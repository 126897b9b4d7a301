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
}

impl Quantizer {
    pub fn new(parameters: &Parameters) -> Quantizer {
        let scale =
            ((f64::from(i32::MAX)) / (parameters.max_participants as f64 * f64::from(parameters.range))).floor();
        Quantizer { range: parameters.range, scale: scale.max(1.0) }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn quantize(&self, x: f32) -> u32 {
        let clipped = if x.is_nan() { 0.0 } else { x.clamp(-self.range, self.range) };
        (f64::from(clipped) * self.scale).round() as i64 as i32 as u32
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
