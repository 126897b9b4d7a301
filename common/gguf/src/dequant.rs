//! Dequantization to f32 (ggml's block formats), and the matching quantizers used to write test
//! files and to check round trips.

use half::f16;

use crate::tensor::TensorType;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes `bytes` (whole blocks of `kind`, as [`crate::TensorInfo::byte_len`] checked) into `out`,
/// which must hold exactly the element count.
pub fn dequantize_into(kind: TensorType, bytes: &[u8], out: &mut [f32]) {
    let (per_block, block_bytes) = kind.block();
    let (per_block, block_bytes) = (per_block as usize, block_bytes as usize);
    debug_assert_eq!(bytes.len() / block_bytes * per_block, out.len());
    for (block, values) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(per_block)) {
        match kind {
            TensorType::F32 => values[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            TensorType::F16 => values[0] = f16_at(block, 0),
            TensorType::Q4_0 => {
                let scale = f16_at(block, 0);
                unpack_nibbles(&block[2..18], values, |q| (q as f32 - 8.0) * scale);
            }
            TensorType::Q4_1 => {
                let (scale, minimum) = (f16_at(block, 0), f16_at(block, 2));
                unpack_nibbles(&block[4..20], values, |q| q as f32 * scale + minimum);
            }
            TensorType::Q8_0 => {
                let scale = f16_at(block, 0);
                for (value, &q) in values.iter_mut().zip(&block[2..34]) {
                    *value = q as i8 as f32 * scale;
                }
            }
        }
    }
}

/// ggml's nibble order: byte i holds weight i in its low half and weight i + 16 in its high half.
fn unpack_nibbles(packed: &[u8], values: &mut [f32], decode: impl Fn(u8) -> f32) {
    for (i, &byte) in packed.iter().enumerate() {
        values[i] = decode(byte & 0x0f);
        values[i + 16] = decode(byte >> 4);
    }
}

/// Encodes `values` (a multiple of the block size) as `kind`, the way ggml's reference quantizers do.
pub fn quantize(kind: TensorType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        TensorType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        TensorType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        TensorType::Q4_0 => {
            for block in values.chunks_exact(32) {
                let extreme = block.iter().copied().fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                let scale = extreme / -8.0;
                let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
                pack_nibbles(block, &mut out, |v| ((v * inverse + 8.5) as i32).clamp(0, 15) as u8);
            }
        }
        TensorType::Q4_1 => {
            for block in values.chunks_exact(32) {
                let minimum = block.iter().copied().fold(f32::INFINITY, f32::min);
                let maximum = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let scale = (maximum - minimum) / 15.0;
                let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(minimum).to_le_bytes());
                pack_nibbles(block, &mut out, |v| (((v - minimum) * inverse + 0.5) as i32).clamp(0, 15) as u8);
            }
        }
        TensorType::Q8_0 => {
            for block in values.chunks_exact(32) {
                let largest = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let scale = largest / 127.0;
                let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
                out.extend(block.iter().map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i8 as u8));
            }
        }
    }
    out
}

fn pack_nibbles(block: &[f32], out: &mut Vec<u8>, encode: impl Fn(f32) -> u8) {
    for i in 0..16 {
        out.push(encode(block[i]) | (encode(block[i + 16]) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_decodes_scale_times_nibble_plus_minimum_in_ggml_order() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        // byte i: low nibble i % 16, high nibble 15 - i % 16
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut out = [0f32; 32];
        dequantize_into(TensorType::Q4_1, &block, &mut out);
        for i in 0..16 {
            assert_eq!(out[i], i as f32 * 0.5 - 1.0);
            assert_eq!(out[i + 16], (15 - i) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q4_0_decode_signed_values() {
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32i8).map(|i| (i - 16) as u8));
        let mut out = [0f32; 32];
        dequantize_into(TensorType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 15.0 * 0.25);

        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend([0x80u8; 16]); // low nibble 0 → -8, high nibble 8 → 0
        dequantize_into(TensorType::Q4_0, &block, &mut out);
        assert_eq!(out[0], -16.0);
        assert_eq!(out[16], 0.0);
    }

    #[test]
    fn quantizers_round_trip_within_half_a_step() {
        let values: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for (kind, step) in
            [(TensorType::Q4_0, 6.0 / 8.0), (TensorType::Q4_1, 6.0 / 15.0), (TensorType::Q8_0, 3.0 / 127.0)]
        {
            let bytes = quantize(kind, &values);
            let mut back = vec![0f32; values.len()];
            dequantize_into(kind, &bytes, &mut back);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{kind:?}: {a} came back as {b}");
            }
        }
    }
}
