//! The rank policy: the largest power-of-two LoRA rank in [r_min, R_max] that fits the device's
//! budgets for training memory, upload per round and training-step time.
//!
//! - Training memory: every adapter parameter costs 16 bytes while training (the f32 value, its
//!   gradient and AdamW's two moments), plus the [`TrainingFootprint`]: the frozen base, held once,
//!   and the activations the backward pass keeps (for a transformer these dominate: all-MiniLM-L6-v2
//!   at batch 16 and 64 tokens: about 245 MB of activations and 91 MB of base, whatever the rank).
//! - Upload: 4 bytes per adapter parameter per round (f32 on the wire).
//! - Step time: measured by the probe at the smallest and largest candidate ranks, interpolated
//!   linearly in between.

use flotilla_torch::model::Architecture;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budgets {
    pub memory_bytes: u64,
    pub upload_bytes: u64,
    pub step_ms: f64,
}

/// Adapter parameters as a function of the rank: `per_rank · r + fixed`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdapterSize {
    pub per_rank: u64,
    pub fixed: u64,
}

impl AdapterSize {
    pub fn params(&self, rank: u32) -> u64 {
        self.per_rank * u64::from(rank) + self.fixed
    }
}

/// What training needs besides the adapter's own parameters: `fixed_bytes` (the frozen base and
/// the activations autograd keeps, whatever the rank) and `per_rank_bytes` (each LoRA module's
/// `x·Aᵀ`, kept for the backward pass, per unit of rank).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainingFootprint {
    pub fixed_bytes: u64,
    pub per_rank_bytes: u64,
}

impl TrainingFootprint {
    /// Estimated for `architecture` training on batches of `batch` inputs (f32 throughout):
    /// - the base's parameters;
    /// - small models: each layer's output, its activation and a mask (3 values per output);
    /// - a transformer, per layer and token: the layer input, Q, K, V, the attention context, its
    ///   projection and the two LayerNorms' inputs and outputs (about 12·hidden), the feed-forward
    ///   block's input, pre- and post-activation (2·intermediate + 4·hidden), and the attention
    ///   weights (heads · length);
    /// - per unit of rank: one value per token for every adapted module.
    ///
    /// `cargo bench -p flotilla-edge --bench transformer_step` measures the real peak
    /// (docs/benchmarks.md) to check the estimate against.
    ///
    /// For a decoder whose projections are kept 4-bit (`decoder_4bit`, `--decoder-base q4`): about
    /// 0.75 bytes per projection weight instead of 4, and training layer by layer keeps every
    /// layer's input but only one layer's activations.
    pub fn estimate_with(architecture: &Architecture, batch: usize, decoder_4bit: bool) -> TrainingFootprint {
        const F32: u64 = 4;
        let batch = batch.max(1) as u64;
        let adapted = architecture.adapted_layers();
        match architecture {
            Architecture::Bert(spec) => {
                let (h, i, heads, tokens) = (
                    u64::from(spec.hidden),
                    u64::from(spec.intermediate),
                    u64::from(spec.heads),
                    u64::from(spec.max_length),
                );
                // Saturating: the sizes come from a checkpoint's config.json.
                let per_token = (16 * h).saturating_add(2 * i).saturating_add(heads.saturating_mul(tokens));
                let activations =
                    [u64::from(spec.layers), batch, tokens, per_token, F32].into_iter().fold(1u64, u64::saturating_mul);
                TrainingFootprint {
                    fixed_bytes: spec.base_parameters().saturating_mul(F32).saturating_add(activations),
                    per_rank_bytes: [adapted.len() as u64, batch, tokens, F32].into_iter().fold(1, u64::saturating_mul),
                }
            }
            Architecture::Llama(spec) => {
                let (h, i, heads, tokens) = (
                    u64::from(spec.hidden),
                    u64::from(spec.intermediate),
                    u64::from(spec.heads),
                    u64::from(spec.max_length),
                );
                let kv = u64::from(spec.kv_heads).saturating_mul(u64::from(spec.head_dim()));
                // What backward keeps per token and layer: norms, q, k, v, attention and MLP outputs
                // (7h + 2kv), the MLP's four i-wide intermediates, and the attention scores.
                let per_token =
                    (7 * h).saturating_add(2 * kv).saturating_add(4 * i).saturating_add(heads.saturating_mul(tokens));
                let layers = u64::from(spec.layers);
                let activations = if decoder_4bit {
                    // Each layer's input, plus one layer's activations at a time.
                    [batch, tokens, F32]
                        .into_iter()
                        .fold(1u64, u64::saturating_mul)
                        .saturating_mul(layers.saturating_mul(h).saturating_add(per_token))
                } else {
                    [layers, batch, tokens, per_token, F32].into_iter().fold(1u64, u64::saturating_mul)
                };
                // Logits (and their softmax and gradient) at the target positions only: at most 32 a sequence.
                let logits =
                    [batch, tokens.min(32), u64::from(spec.vocab), 3 * F32].into_iter().fold(1, u64::saturating_mul);
                // The projections' weights: 4-bit blocks (24 bytes per 32 weights) or f32.
                let projections: u64 = adapted_projection_weights(spec);
                let base = if decoder_4bit {
                    spec.base_parameters()
                        .saturating_sub(projections)
                        .saturating_mul(F32)
                        .saturating_add(projections * 3 / 4)
                } else {
                    spec.base_parameters().saturating_mul(F32)
                };
                TrainingFootprint {
                    fixed_bytes: base.saturating_add(activations).saturating_add(logits),
                    per_rank_bytes: [adapted.len() as u64, batch, tokens, F32].into_iter().fold(1, u64::saturating_mul),
                }
            }
            _ => {
                let base: u64 = adapted.iter().map(|l| ((l.d_in + 1) * l.d_out) as u64).sum();
                let outputs: u64 = adapted.iter().map(|l| l.d_out as u64).sum();
                TrainingFootprint {
                    fixed_bytes: base * F32 + 3 * batch * outputs * F32,
                    per_rank_bytes: adapted.len() as u64 * batch * F32,
                }
            }
        }
    }

    fn bytes(&self, rank: u32) -> u64 {
        self.fixed_bytes.saturating_add(self.per_rank_bytes.saturating_mul(u64::from(rank)))
    }
}

/// Weights of a decoder's projections (every linear module of its layers).
fn adapted_projection_weights(spec: &flotilla_torch::model::DecoderSpec) -> u64 {
    let every = flotilla_torch::model::DecoderSpec {
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        ..spec.clone()
    };
    Architecture::Llama(every).adapted_layers().iter().map(|l| (l.d_in * l.d_out) as u64).sum()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankRow {
    pub rank: u32,
    pub training_memory_bytes: u64,
    pub upload_bytes: u64,
    pub step_ms: f64,
    /// What the adapter adds to the step at this rank (the step less the frozen model's share,
    /// see [`frozen_step_ms`]): what the step budget weighs.
    pub adapter_step_ms: f64,
    /// The first budget this rank exceeds, if any.
    pub exceeds: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankChoice {
    pub rank: u32,
    pub reason: String,
    pub candidates: Vec<RankRow>,
}

pub const TRAINING_BYTES_PER_PARAM: u64 = 16;
pub const UPLOAD_BYTES_PER_PARAM: u64 = 4;

/// Powers of two in [r_min, r_max], plus r_max itself if it is not one.
pub fn candidates(r_min: u32, r_max: u32) -> Vec<u32> {
    let mut ranks: Vec<u32> = (0..32).map(|p| 1u32 << p).filter(|&r| r >= r_min.max(1) && r <= r_max).collect();
    if r_max >= r_min.max(1) && !r_max.is_power_of_two() {
        ranks.push(r_max);
    }
    ranks
}

/// The frozen model's share of a training step: the step time extrapolated to rank 0 along the
/// line through the smallest and the largest candidate rank. The step budget weighs what a rank
/// adds to the step, not the step itself: on a transformer the frozen model dominates (a MiniLM
/// step costs about the same at rank 1 and rank 64), so a budget on the whole step would give
/// every slow device rank 1 although a lower rank buys it no time. With one candidate there is
/// no line, and the whole step counts.
pub fn frozen_step_ms(ranks: &[u32], step_ms: &impl Fn(u32) -> f64) -> f64 {
    match (ranks.first(), ranks.last()) {
        (Some(&low), Some(&high)) if high > low => {
            let (at_low, at_high) = (step_ms(low), step_ms(high));
            // Timing noise can make the larger rank look faster: then nothing is the adapter's.
            let per_rank = ((at_high - at_low) / f64::from(high - low)).max(0.0);
            (at_low - per_rank * f64::from(low)).clamp(0.0, at_low.max(0.0))
        }
        _ => 0.0,
    }
}

pub fn choose(
    size: AdapterSize,
    footprint: TrainingFootprint,
    step_ms: impl Fn(u32) -> f64,
    budgets: Budgets,
    r_min: u32,
    r_max: u32,
) -> RankChoice {
    let ranks = candidates(r_min, r_max);
    let frozen = frozen_step_ms(&ranks, &step_ms);
    let rows: Vec<RankRow> = ranks
        .into_iter()
        .map(|rank| {
            let params = size.params(rank);
            let memory = params.saturating_mul(TRAINING_BYTES_PER_PARAM).saturating_add(footprint.bytes(rank));
            let (upload, step) = (params * UPLOAD_BYTES_PER_PARAM, step_ms(rank));
            let adapter_step = (step - frozen).max(0.0);
            let exceeds = if memory > budgets.memory_bytes {
                Some("memory")
            } else if upload > budgets.upload_bytes {
                Some("upload")
            } else if adapter_step > budgets.step_ms {
                Some("step time")
            } else {
                None
            };
            RankRow {
                rank,
                training_memory_bytes: memory,
                upload_bytes: upload,
                step_ms: step,
                adapter_step_ms: adapter_step,
                exceeds,
            }
        })
        .collect();
    let fitting = rows.iter().rev().find(|r| r.exceeds.is_none());
    let (rank, reason) = match (fitting, rows.first()) {
        (Some(best), _) if best.rank == rows.last().map_or(best.rank, |r| r.rank) => {
            (best.rank, format!("R_max {}: every budget allows it", best.rank))
        }
        (Some(best), _) => {
            let next = rows.iter().find(|r| r.rank > best.rank).and_then(|r| r.exceeds).unwrap_or("a budget");
            (
                best.rank,
                format!(
                    "rank {} would exceed the {next} budget",
                    rows.iter().find(|r| r.rank > best.rank).map_or(0, |r| r.rank)
                ),
            )
        }
        (None, Some(smallest)) => (
            smallest.rank,
            format!(
                "even rank {} exceeds the {} budget; using the minimum rank",
                smallest.rank,
                smallest.exceeds.unwrap_or("")
            ),
        ),
        (None, None) => (r_min.max(1), "no candidate rank (r_min > R_max); using r_min".into()),
    };
    RankChoice { rank, reason, candidates: rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: AdapterSize = AdapterSize { per_rank: 1000, fixed: 500 };
    const NO_FOOTPRINT: TrainingFootprint = TrainingFootprint { fixed_bytes: 0, per_rank_bytes: 0 };
    const ROOMY: Budgets = Budgets { memory_bytes: u64::MAX, upload_bytes: u64::MAX, step_ms: f64::MAX };

    #[test]
    fn candidates_are_powers_of_two_in_range() {
        assert_eq!(candidates(1, 64), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(candidates(3, 24), vec![4, 8, 16, 24]);
        assert_eq!(candidates(0, 1), vec![1]);
        assert!(candidates(16, 8).is_empty());
    }

    #[test]
    fn roomy_budgets_give_r_max() {
        let choice = choose(SIZE, NO_FOOTPRINT, |_| 1.0, ROOMY, 1, 64);
        assert_eq!(choice.rank, 64);
        assert!(choice.reason.contains("every budget"), "{}", choice.reason);
    }

    #[test]
    fn each_budget_can_bind_and_is_named() {
        // rank 8: 8,500 params → 136,000 bytes of training memory, 34,000 bytes of upload.
        let memory = Budgets { memory_bytes: 136_000, ..ROOMY };
        let choice = choose(SIZE, NO_FOOTPRINT, |_| 1.0, memory, 1, 64);
        assert_eq!(choice.rank, 8);
        assert!(choice.reason.contains("rank 16") && choice.reason.contains("memory"), "{}", choice.reason);
        let upload = Budgets { upload_bytes: 34_000, ..ROOMY };
        assert_eq!(choose(SIZE, NO_FOOTPRINT, |_| 1.0, upload, 1, 64).rank, 8);
        let step = Budgets { step_ms: 10.0, ..ROOMY };
        let choice = choose(SIZE, NO_FOOTPRINT, f64::from, step, 1, 64);
        assert_eq!(choice.rank, 8);
        assert!(choice.reason.contains("step time"), "{}", choice.reason);
    }

    #[test]
    fn the_training_footprint_counts_against_the_memory_budget() {
        let memory = Budgets { memory_bytes: 136_000, ..ROOMY };
        // 100,000 bytes of base and activations leave room for rank 1 only (24,000 + 100,000).
        let footprint = TrainingFootprint { fixed_bytes: 100_000, per_rank_bytes: 0 };
        assert_eq!(choose(SIZE, footprint, |_| 1.0, memory, 1, 64).rank, 1);
        // Per-rank activations: rank 8 needs 136,000 + 8·2,000; rank 4 fits.
        let footprint = TrainingFootprint { fixed_bytes: 0, per_rank_bytes: 2_000 };
        assert_eq!(choose(SIZE, footprint, |_| 1.0, memory, 1, 64).rank, 4);
    }

    #[test]
    fn a_transformer_footprint_is_dominated_by_activations_and_the_base() {
        use flotilla_torch::model::{Activation, BertSpec, Pooling};
        let minilm = Architecture::Bert(BertSpec {
            layers: 6,
            hidden: 384,
            heads: 12,
            intermediate: 1536,
            vocab: 30522,
            max_positions: 512,
            type_vocab: 2,
            layer_norm_eps: 1e-12,
            activation: Activation::Gelu,
            pooling: Pooling::Cls,
            target_modules: vec!["query".into(), "value".into()],
            labels: vec!["a".into(), "b".into()],
            max_length: 64,
        });
        let footprint = TrainingFootprint::estimate_with(&minilm, 16, false);
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        // 22.7 M parameters (86.6 MiB) and 6 layers · 16 · 64 tokens · 9,984 values (234 MiB).
        assert!((mib(footprint.fixed_bytes) - (86.6 + 234.0)).abs() < 1.0, "{}", mib(footprint.fixed_bytes));
        assert_eq!(footprint.per_rank_bytes, 12 * 16 * 64 * 4);
        // So a phone's 256 MiB cannot train it at this batch and length, whatever the rank.
        let phone = Budgets { memory_bytes: 256 << 20, ..ROOMY };
        let size = AdapterSize { per_rank: 12 * 768, fixed: 5 * 385 };
        assert!(choose(size, footprint, |_| 1.0, phone, 1, 16).reason.contains("exceeds the memory budget"));
    }

    #[test]
    fn the_step_budget_weighs_what_the_adapter_adds_not_the_frozen_model() {
        // A transformer-like step: 500 ms of frozen model, 0.5 ms per unit of rank.
        let step = Budgets { step_ms: 10.0, ..ROOMY };
        let choice = choose(SIZE, NO_FOOTPRINT, |r| 500.0 + 0.5 * f64::from(r), step, 1, 64);
        assert_eq!(choice.rank, 16, "{choice:?}");
        assert!(choice.reason.contains("rank 32") && choice.reason.contains("step time"), "{}", choice.reason);
        let row16 = &choice.candidates[4];
        assert_eq!((row16.rank, row16.step_ms, row16.adapter_step_ms), (16, 508.0, 8.0));
        // Noise that makes the larger rank look faster leaves nothing to the adapter.
        assert_eq!(choose(SIZE, NO_FOOTPRINT, |r| 500.0 - f64::from(r), step, 1, 64).rank, 64);
        // One candidate: no line to extrapolate, the whole step counts.
        assert_eq!(frozen_step_ms(&[8], &|_| 500.0), 0.0);
        assert!(choose(SIZE, NO_FOOTPRINT, |_| 500.0, step, 8, 8).reason.contains("step time"));
    }

    #[test]
    fn nothing_fits_falls_back_to_the_minimum_and_says_so() {
        let tiny = Budgets { memory_bytes: 1, ..ROOMY };
        let choice = choose(SIZE, NO_FOOTPRINT, |_| 1.0, tiny, 2, 64);
        assert_eq!(choice.rank, 2);
        assert!(choice.reason.contains("exceeds the memory budget"), "{}", choice.reason);
        assert_eq!(choose(SIZE, NO_FOOTPRINT, |_| 1.0, ROOMY, 16, 8).rank, 16);
    }

    #[test]
    fn a_decoder_kept_4_bit_needs_less_than_half_the_memory_of_its_f32_base() {
        let spec = flotilla_torch::model::DecoderSpec {
            layers: 30,
            hidden: 576,
            intermediate: 1536,
            heads: 9,
            kv_heads: 3,
            vocab: 49152,
            context: 8192,
            rms_eps: 1e-5,
            rope_base: 1e5,
            tied_embeddings: true,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            max_length: 128,
            labels: vec!["text".into()],
            task: Default::default(),
        };
        let decoder = Architecture::Llama(spec);
        let dense = TrainingFootprint::estimate_with(&decoder, 8, false);
        let packed = TrainingFootprint::estimate_with(&decoder, 8, true);
        // SmolLM2-135M at batch 8 × 128: the f32 base alone is 538 MB.
        assert!(dense.fixed_bytes > 538_000_000, "{dense:?}");
        assert!(packed.fixed_bytes * 2 < dense.fixed_bytes, "{packed:?} against {dense:?}");
        assert_eq!(packed.per_rank_bytes, dense.per_rank_bytes);
    }
}
