//! Federated evaluation under secure aggregation: a device's evaluation sums laid out as one
//! vector of small integers, masked and summed with SecAgg+ (`flotilla_secagg`) among the devices
//! asked, so that the coordinator learns each group's totals and nothing about any one device.
//!
//! **The vector.** One block per group whose totals the coordinator may publish (every device,
//! each rank, each device class, each cell of the cross-rank view: [`BlockFill`] tells a device
//! which blocks are its own and with which model's scores), then a final 1, the device's weight,
//! which the secure sum checks. A device leaves zeros in the blocks of groups it is not in.
//!
//! **Exact counts.** Every count of a block is split into three 16-bit limbs, so each coordinate
//! is an integer in [0, 65535]: exact in `f32`, and with the quantization range set to 65535 the
//! ring holds the sum of up to [`MAX_PARTICIPANTS`] devices, so the unmasked totals are the exact
//! integer sums. Losses and ROUGE-L sums travel as whole millionths (each device's off by at most
//! 0.5·10⁻⁶).

use crate::evaluation::{BlockFill, EvaluationSums, LabelSums, RankSums, SecureEvaluation};

/// Bits of one limb.
const LIMB_BITS: u32 = 16;
/// Limbs per count: counts up to 2⁴⁸ − 1.
const LIMBS: usize = 3;
/// The largest limb, and the secure sum's quantization range for evaluation vectors.
pub const LIMB_RANGE: f32 = 65535.0;
/// Counts at or above this do not fit three limbs.
pub const COUNT_LIMIT: u64 = 1 << (LIMB_BITS * LIMBS as u32);
/// Losses and ROUGE-L sums travel in these units.
pub const MICRO: f64 = 1e6;
/// The most devices one secure evaluation may have: n · 65535 must stay below 2³¹ − 1.
pub const MAX_PARTICIPANTS: usize = (i32::MAX as usize - 1) / LIMB_RANGE as usize;

impl SecureEvaluation {
    pub fn layout(&self) -> SumsLayout {
        SumsLayout { classes: self.classes as usize, blocks: self.blocks.len() }
    }
}

/// One group's totals, unmasked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockTotals {
    /// Devices that reported sums to the group, and that declined.
    pub reporting: u64,
    pub declined: u64,
    /// Their held-out examples, declared.
    pub held_out: u64,
    pub sums: EvaluationSums,
}

/// Why sums cannot be laid out, or unmasked totals cannot be read back.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecureSumsError {
    #[error("{got} blocks named, the layout has {expected}")]
    Blocks { got: usize, expected: usize },
    #[error("a count of {0} does not fit the secure evaluation's 48 bits")]
    TooLarge(u64),
    #[error("a loss or ROUGE-L sum of {0} is not a finite, non-negative number")]
    BadReal(f64),
    #[error("{labels} labels scored, the model has {classes}")]
    Labels { labels: usize, classes: usize },
    #[error("rank {0}'s scores were asked for a block but not computed")]
    MissingRank(u32),
    #[error("{got} unmasked values, the layout has {expected}")]
    Length { got: usize, expected: usize },
    #[error("unmasked value {index} is {value}, not a whole non-negative limb sum")]
    NotWhole { index: usize, value: f64 },
}

/// The shape of an evaluation vector: `blocks` blocks of a model with `classes` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SumsLayout {
    pub classes: usize,
    pub blocks: usize,
}

/// The counts of a block, in order: reporting, declined, held out, examples, scored, correct,
/// loss (millionths), headlines, ROUGE-L (millionths), then support, correct and predicted of
/// each label.
const FIXED_FIELDS: usize = 9;

impl SumsLayout {
    fn fields(&self) -> usize {
        FIXED_FIELDS + 3 * self.classes
    }

    pub fn block_len(&self) -> usize {
        LIMBS * self.fields()
    }

    /// The whole vector's length: the blocks and the weight.
    pub fn vector_len(&self) -> usize {
        self.blocks * self.block_len() + 1
    }

    /// The secure sum's layout: every coordinate shared by every participant (rank 0).
    pub fn secagg_layout(&self) -> flotilla_secagg::layout::Layout {
        flotilla_secagg::layout::Layout { shared: self.vector_len(), per_slot: 0, max_rank: 0 }
    }

    /// A device's vector: `own` scores (None: it declines) and its `cross` scores put in the blocks
    /// `fills` names, its declared `held_out` size beside them.
    pub fn encode(
        &self,
        fills: &[BlockFill],
        held_out: u64,
        own: Option<&EvaluationSums>,
        cross: &[RankSums],
    ) -> Result<Vec<f32>, SecureSumsError> {
        if fills.len() != self.blocks {
            return Err(SecureSumsError::Blocks { got: fills.len(), expected: self.blocks });
        }
        let mut vector = Vec::with_capacity(self.vector_len());
        for fill in fills {
            let sums = match (fill, own) {
                (BlockFill::Empty, _) => {
                    vector.extend(std::iter::repeat_n(0.0, self.block_len()));
                    continue;
                }
                (_, None) => None,
                (BlockFill::Own, Some(own)) => Some(own),
                (BlockFill::Rank(rank), Some(_)) => {
                    Some(&cross.iter().find(|c| c.rank == *rank).ok_or(SecureSumsError::MissingRank(*rank))?.sums)
                }
            };
            self.encode_block(&mut vector, held_out, sums)?;
        }
        vector.push(1.0);
        Ok(vector)
    }

    fn encode_block(
        &self,
        vector: &mut Vec<f32>,
        held_out: u64,
        sums: Option<&EvaluationSums>,
    ) -> Result<(), SecureSumsError> {
        let empty = EvaluationSums::default();
        let scored = sums.unwrap_or(&empty);
        if scored.labels.len() > self.classes {
            return Err(SecureSumsError::Labels { labels: scored.labels.len(), classes: self.classes });
        }
        let reporting = u64::from(sums.is_some());
        let mut counts = vec![
            reporting,
            1 - reporting,
            held_out,
            scored.examples,
            scored.scored,
            scored.correct,
            micro(scored.loss_sum)?,
            scored.generated,
            micro(scored.rouge_l_sum)?,
        ];
        for index in 0..self.classes {
            let label = scored.labels.get(index).copied().unwrap_or_default();
            counts.extend([label.support, label.correct, label.predicted]);
        }
        for count in counts {
            if count >= COUNT_LIMIT {
                return Err(SecureSumsError::TooLarge(count));
            }
            for limb in 0..LIMBS {
                vector.push(((count >> (LIMB_BITS * limb as u32)) & 0xFFFF) as f32);
            }
        }
        Ok(())
    }

    /// Each block's totals from the unmasked sums of the whole vector (the weight last).
    pub fn decode(&self, sums: &[f64]) -> Result<Vec<BlockTotals>, SecureSumsError> {
        if sums.len() != self.vector_len() {
            return Err(SecureSumsError::Length { got: sums.len(), expected: self.vector_len() });
        }
        let mut counts = Vec::with_capacity(self.blocks * self.fields());
        for (field, limbs) in sums[..sums.len() - 1].chunks_exact(LIMBS).enumerate() {
            let mut count: u128 = 0;
            for (limb, &value) in limbs.iter().enumerate() {
                let whole = value.round();
                if !value.is_finite() || whole < 0.0 || (value - whole).abs() > 1e-6 {
                    return Err(SecureSumsError::NotWhole { index: field * LIMBS + limb, value });
                }
                count += (whole as u128) << (LIMB_BITS * limb as u32);
            }
            counts.push(u64::try_from(count).map_err(|_| SecureSumsError::TooLarge(u64::MAX))?);
        }
        Ok(counts.chunks_exact(self.fields()).map(|block| self.totals(block)).collect())
    }

    fn totals(&self, block: &[u64]) -> BlockTotals {
        let labels = block[FIXED_FIELDS..]
            .chunks_exact(3)
            .map(|l| LabelSums { support: l[0], correct: l[1], predicted: l[2] })
            .collect();
        BlockTotals {
            reporting: block[0],
            declined: block[1],
            held_out: block[2],
            sums: EvaluationSums {
                examples: block[3],
                scored: block[4],
                correct: block[5],
                loss_sum: block[6] as f64 / MICRO,
                generated: block[7],
                rouge_l_sum: block[8] as f64 / MICRO,
                labels,
            },
        }
    }
}

/// `value` in whole millionths.
fn micro(value: f64) -> Result<u64, SecureSumsError> {
    let scaled = (value * MICRO).round();
    if !value.is_finite() || value < 0.0 || scaled >= COUNT_LIMIT as f64 {
        return Err(SecureSumsError::BadReal(value));
    }
    Ok(scaled as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_secagg::client::ClientRound;
    use flotilla_secagg::server::ServerRound;
    use flotilla_secagg::Parameters;
    use std::collections::BTreeMap;

    fn classifier(confusion: &[Vec<u64>], loss: f64) -> EvaluationSums {
        EvaluationSums::from_confusion(confusion, loss)
    }

    fn add(vectors: &[Vec<f32>]) -> Vec<f64> {
        let mut total = vec![0.0; vectors[0].len()];
        for vector in vectors {
            for (t, v) in total.iter_mut().zip(vector) {
                *t += f64::from(*v);
            }
        }
        total
    }

    #[test]
    fn the_totals_of_encoded_sums_are_the_exact_sums_of_each_group() {
        let layout = SumsLayout { classes: 3, blocks: 3 };
        let a = classifier(&[vec![3, 1, 0], vec![0, 4, 0], vec![0, 0, 2]], 4.25);
        let b = classifier(&[vec![1, 0, 0], vec![2, 2, 0], vec![0, 1, 0]], 7.5);
        let big = EvaluationSums { examples: COUNT_LIMIT - 1, scored: COUNT_LIMIT - 1, ..classifier(&[], 0.0) };
        let fills_a = [BlockFill::Own, BlockFill::Own, BlockFill::Empty];
        let fills_b = [BlockFill::Own, BlockFill::Empty, BlockFill::Own];
        let vectors = vec![
            layout.encode(&fills_a, 12, Some(&a), &[]).unwrap(),
            layout.encode(&fills_b, 6, Some(&b), &[]).unwrap(),
            // A device that declines adds to the declined count of its groups and nothing else.
            layout.encode(&fills_a, 9, None, &[]).unwrap(),
        ];
        assert!(vectors.iter().flatten().all(|v| (0.0..=LIMB_RANGE).contains(v) && v.fract() == 0.0));
        let totals = layout.decode(&add(&vectors)).unwrap();
        let mut both = a.clone();
        both.add(&b).unwrap();
        assert_eq!((totals[0].reporting, totals[0].declined, totals[0].held_out), (2, 1, 27));
        assert_eq!(totals[0].sums.labels, both.labels);
        assert_eq!((totals[0].sums.examples, totals[0].sums.correct), (both.examples, both.correct));
        assert!((totals[0].sums.loss_sum - 11.75).abs() < 1e-9);
        assert_eq!((totals[1].reporting, totals[1].declined, totals[1].sums.correct), (1, 1, a.correct));
        assert_eq!((totals[2].reporting, totals[2].sums.examples), (1, b.examples));
        // 48 bits round-trip; 2⁴⁸ does not fit.
        let one = SumsLayout { classes: 0, blocks: 1 };
        let vector = one.encode(&[BlockFill::Own], 0, Some(&big), &[]).unwrap();
        assert_eq!(one.decode(&add(&[vector])).unwrap()[0].sums.examples, COUNT_LIMIT - 1);
        let too_big = EvaluationSums { examples: COUNT_LIMIT, ..big };
        assert_eq!(one.encode(&[BlockFill::Own], 0, Some(&too_big), &[]), Err(SecureSumsError::TooLarge(COUNT_LIMIT)));
    }

    #[test]
    fn bad_sums_and_bad_totals_are_refused_with_the_reason() {
        let layout = SumsLayout { classes: 2, blocks: 2 };
        let good = classifier(&[vec![1, 0], vec![0, 1]], 1.0);
        assert!(matches!(layout.encode(&[BlockFill::Own], 2, Some(&good), &[]), Err(SecureSumsError::Blocks { .. })));
        let fills = [BlockFill::Own, BlockFill::Rank(4)];
        assert_eq!(layout.encode(&fills, 2, Some(&good), &[]), Err(SecureSumsError::MissingRank(4)));
        let cross = [RankSums { rank: 4, sums: good.clone() }];
        assert!(layout.encode(&fills, 2, Some(&good), &cross).is_ok());
        let three = classifier(&[vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 1]], 1.0);
        assert!(matches!(layout.encode(&fills, 3, Some(&three), &cross), Err(SecureSumsError::Labels { .. })));
        let nan = EvaluationSums { loss_sum: f64::NAN, ..good.clone() };
        assert!(matches!(layout.encode(&fills, 2, Some(&nan), &cross), Err(SecureSumsError::BadReal(_))));
        let mut sums = add(&[layout.encode(&fills, 2, Some(&good), &cross).unwrap()]);
        assert!(layout.decode(&sums[1..]).is_err());
        sums[4] = 0.5;
        assert!(matches!(layout.decode(&sums), Err(SecureSumsError::NotWhole { index: 4, .. })));
        sums[4] = -1.0;
        assert!(matches!(layout.decode(&sums), Err(SecureSumsError::NotWhole { index: 4, .. })));
    }

    /// The layout through the real SecAgg+ rounds: the coordinator's unmasked totals are the
    /// devices' exact sums.
    #[test]
    fn masked_evaluation_sums_unmask_to_the_exact_totals() {
        let layout = SumsLayout { classes: 2, blocks: 1 };
        let parameters = Parameters { threshold: 2, degree: 2, range: LIMB_RANGE, max_participants: MAX_PARTICIPANTS };
        parameters.validate().unwrap();
        let secagg = layout.secagg_layout();
        let ids: BTreeMap<u32, u32> = (1..=3).map(|id| (id, 0)).collect();
        let mut server = ServerRound::new(parameters, 77, secagg, ids.clone(), 5).unwrap();
        let mut clients = BTreeMap::new();
        for &id in ids.keys() {
            let (client, advert) = ClientRound::new(parameters, 77, id, 0, secagg).unwrap();
            server.receive_keys(advert).unwrap();
            clients.insert(id, client);
        }
        for (&id, client) in clients.iter_mut() {
            let shares = client.share_keys(&server.peers_for(id)).unwrap();
            server.receive_shares(id, shares).unwrap();
        }
        let devices: Vec<EvaluationSums> =
            (0..3u64).map(|d| classifier(&[vec![40_000 + d, 3], vec![d, 70_000]], 1234.5 + d as f64)).collect();
        let mut expected = EvaluationSums::default();
        for ((&id, client), device) in clients.iter_mut().zip(&devices) {
            assert!(client.receive_shares(server.shares_for(id)).is_empty());
            let vector = layout.encode(&[BlockFill::Own], device.examples, Some(device), &[]).unwrap();
            server.receive_masked(client.masked_input(&vector).unwrap()).unwrap();
            expected.add(device).unwrap();
        }
        let request = server.unmask_request();
        for client in clients.into_values() {
            server.receive_unmask(client.unmask(&request).unwrap()).unwrap();
        }
        let aggregate = server.finish().unwrap();
        let totals = layout.decode(&aggregate.sums).unwrap();
        assert_eq!(totals[0].reporting, 3);
        assert_eq!(totals[0].sums.labels, expected.labels);
        assert_eq!(totals[0].sums.correct, expected.correct);
        assert!((totals[0].sums.loss_sum - expected.loss_sum).abs() < 1e-6);
    }
}
