//! Federated evaluation under `[secure_aggregation]`: the devices' sums are added up by a SecAgg+
//! session of their own (`flotilla_wire::secure_evaluation` lays them out), so the coordinator
//! learns group totals and never one device's sums.
//!
//! The groups are fixed before any device is asked: every device, each rank, each device class and
//! (for the final model's cross-rank view) each (model rank, class) cell, each only when at least
//! `min_group_devices` and threshold + 1 of the devices asked belong to it. Each gets a block of
//! the vector; a device fills the blocks of its groups. After unmasking, a group's totals are kept
//! only when enough of its members' masked sums are in, and every total is checked for
//! consistency (counts that add up, no more examples than held out, no more reports than members):
//! a device cannot be checked on its own, so an inconsistent total discards the evaluation.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_secagg::server::Aggregate;
use flotilla_wire::evaluation::EvaluationSums;
use flotilla_wire::evaluation::{BlockFill, SecureEvaluation};
use flotilla_wire::secure_evaluation::SumsLayout;

use crate::config::secure::SecureAggregationSection;
use crate::records::federated_evaluation::MaskedEvaluationRecord;
use crate::serve::federated_evaluation::{Evaluator, GroupKey};
use crate::serve::secure::{SecureRound, SessionAction};

/// One model's secure evaluation: its SecAgg+ session and the groups its blocks stand for.
pub struct SecureEvaluationSession {
    pub model_round: u32,
    session: u64,
    participants: usize,
    /// The SecAgg+ state, until its sums are being unmasked.
    pub round: Option<SecureRound>,
    /// Each block's group and the devices asked that belong to it.
    groups: Vec<(GroupKey, BTreeSet<String>)>,
    layout: SumsLayout,
    /// The fewest members whose sums a published total may hold.
    min_members: usize,
}

/// What unmasking gave: the totals of the groups that may be published.
#[derive(Debug)]
pub struct SecureTotals {
    pub survivors: Vec<String>,
    pub declined: usize,
    pub groups: Vec<(GroupKey, usize, EvaluationSums)>,
}

impl SecureEvaluationSession {
    /// Plans model `model_round`'s evaluation by the devices `asked` (a model of `classes` labels;
    /// 0 for a decoder); returns it and each device's part of its task.
    pub fn start(
        model_round: u32,
        asked: &BTreeMap<String, Evaluator>,
        section: &SecureAggregationSection,
        min_group_devices: usize,
        classes: usize,
    ) -> anyhow::Result<(SecureEvaluationSession, Vec<SessionAction>, BTreeMap<String, SecureEvaluation>)> {
        let devices: Vec<String> = asked.keys().cloned().collect();
        let holders = section.parameters_for(devices.len())?.min_holders();
        let min_members = min_group_devices.max(holders);
        let groups = plan_groups(asked, min_members);
        let layout = SumsLayout { classes, blocks: groups.len() };
        let (round, actions, tasks) =
            SecureRound::start_evaluation(model_round, &devices, section, layout.secagg_layout())?;
        let parts = tasks
            .into_iter()
            .map(|(device, task)| {
                let evaluator = &asked[&device];
                let blocks = groups.iter().map(|(key, _)| fill(key, evaluator)).collect();
                (device, SecureEvaluation { task, blocks, classes: classes as u32 })
            })
            .collect();
        let (session, participants) = (round.session, round.participants());
        let round = Some(round);
        let session =
            SecureEvaluationSession { model_round, session, participants, round, groups, layout, min_members };
        Ok((session, actions, parts))
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// The record of the secure sum so far (unmasking fills in the rest).
    pub fn record(&self) -> MaskedEvaluationRecord {
        MaskedEvaluationRecord {
            participants: self.participants,
            groups: self.groups.len(),
            ..MaskedEvaluationRecord::default()
        }
    }

    /// The totals in `aggregate` (`names`: each participant id's device), or why they are refused.
    pub fn totals(&self, aggregate: &Aggregate, names: &BTreeMap<u32, String>) -> Result<SecureTotals, String> {
        let survivors: BTreeSet<String> = aggregate.survivors.iter().filter_map(|id| names.get(id).cloned()).collect();
        let blocks = self.layout.decode(&aggregate.sums).map_err(|e| format!("unmasked sums: {e}"))?;
        let mut declined = 0;
        let mut groups = Vec::new();
        for ((key, members), totals) in self.groups.iter().zip(blocks) {
            let present = members.intersection(&survivors).count();
            let answered = totals.reporting.saturating_add(totals.declined);
            let consistent =
                if *key == GroupKey::Total { answered == present as u64 } else { answered <= present as u64 };
            if !consistent {
                return Err(format!(
                    "the {key:?} totals count {} report(s) and {} decline(s) from {present} device(s)",
                    totals.reporting, totals.declined
                ));
            }
            totals
                .sums
                .check(totals.held_out, self.layout.classes)
                .map_err(|e| format!("the {key:?} totals do not add up: {e}"))?;
            if *key == GroupKey::Total {
                declined = totals.declined as usize;
            }
            // Too few of its members are in: the total would say too much about each of them.
            if present >= self.min_members {
                groups.push((key.clone(), totals.reporting as usize, totals.sums));
            }
        }
        Ok(SecureTotals { survivors: survivors.into_iter().collect(), declined, groups })
    }
}

/// The groups with at least `min_members` of the devices `asked`, each with its members: every
/// device first, then each rank, each class, and the cross-rank view's cells.
pub fn plan_groups(asked: &BTreeMap<String, Evaluator>, min_members: usize) -> Vec<(GroupKey, BTreeSet<String>)> {
    let mut groups: BTreeMap<GroupKey, BTreeSet<String>> = BTreeMap::new();
    for (device, evaluator) in asked {
        let mut keys = vec![GroupKey::Total, GroupKey::Rank(evaluator.rank), GroupKey::Class(evaluator.class.clone())];
        if !evaluator.cross.is_empty() {
            let ranks = evaluator.cross.iter().copied().chain([evaluator.rank]);
            keys.extend(ranks.map(|rank| GroupKey::Cross(rank, evaluator.class.clone())));
        }
        for key in keys {
            groups.entry(key).or_default().insert(device.clone());
        }
    }
    groups.into_iter().filter(|(_, members)| members.len() >= min_members).collect()
}

/// What `evaluator` puts in the block of group `key`.
fn fill(key: &GroupKey, evaluator: &Evaluator) -> BlockFill {
    match key {
        GroupKey::Total => BlockFill::Own,
        GroupKey::Rank(rank) if *rank == evaluator.rank => BlockFill::Own,
        GroupKey::Class(class) if *class == evaluator.class => BlockFill::Own,
        GroupKey::Cross(rank, class) if *class == evaluator.class => {
            if *rank == evaluator.rank {
                BlockFill::Own
            } else if evaluator.cross.contains(rank) {
                BlockFill::Rank(*rank)
            } else {
                BlockFill::Empty
            }
        }
        _ => BlockFill::Empty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(devices: &[(&str, u32, &str, &[u32])]) -> BTreeMap<String, Evaluator> {
        devices
            .iter()
            .map(|(d, rank, class, cross)| {
                (d.to_string(), Evaluator { rank: *rank, class: class.to_string(), cross: cross.to_vec() })
            })
            .collect()
    }

    #[test]
    fn only_groups_with_enough_members_get_a_block_and_each_device_fills_its_own() {
        let fleet = asked(&[
            ("a", 2, "phone", &[8]),
            ("b", 2, "phone", &[8]),
            ("c", 2, "phone", &[8]),
            ("d", 8, "laptop", &[2]),
        ]);
        let groups = plan_groups(&fleet, 3);
        let keys: Vec<GroupKey> = groups.iter().map(|(k, _)| k.clone()).collect();
        // The laptop class and rank 8 have one device each: no block.
        assert_eq!(
            keys,
            vec![
                GroupKey::Total,
                GroupKey::Rank(2),
                GroupKey::Class("phone".into()),
                GroupKey::Cross(2, "phone".into()),
                GroupKey::Cross(8, "phone".into()),
            ]
        );
        let fills: Vec<BlockFill> = keys.iter().map(|k| fill(k, &fleet["a"])).collect();
        assert_eq!(fills, vec![BlockFill::Own, BlockFill::Own, BlockFill::Own, BlockFill::Own, BlockFill::Rank(8)]);
        let fills: Vec<BlockFill> = keys.iter().map(|k| fill(k, &fleet["d"])).collect();
        assert_eq!(fills, vec![BlockFill::Own, BlockFill::Empty, BlockFill::Empty, BlockFill::Empty, BlockFill::Empty]);
    }

    fn aggregate(layout: SumsLayout, vectors: &[Vec<f32>], survivors: Vec<u32>) -> Aggregate {
        let mut sums = vec![0.0; layout.vector_len()];
        for vector in vectors {
            sums.iter_mut().zip(vector).for_each(|(s, v)| *s += f64::from(*v));
        }
        Aggregate { sums, revealed_rank: 0, survivors, dropped: Vec::new(), error_bound: 0.0 }
    }

    #[test]
    fn unmasked_totals_are_checked_and_thin_groups_are_dropped() {
        let fleet = asked(&[("a", 2, "phone", &[]), ("b", 2, "phone", &[]), ("c", 4, "phone", &[])]);
        let section: SecureAggregationSection = toml::from_str("threshold = 2").unwrap();
        let (session, _, parts) = SecureEvaluationSession::start(3, &fleet, &section, 2, 2).unwrap();
        // Every device, the phones: rank 2 has two devices, fewer than threshold + 1 = 3.
        assert_eq!(session.groups(), 2);
        let sums = EvaluationSums::from_confusion(&[vec![2, 1], vec![0, 3]], 1.5);
        let vectors: Vec<Vec<f32>> =
            parts.values().map(|part| part.layout().encode(&part.blocks, 6, Some(&sums), &[]).unwrap()).collect();
        let names: BTreeMap<u32, String> = [(1, "a"), (2, "b"), (3, "c")].map(|(i, d)| (i, d.to_string())).into();
        let totals = session.totals(&aggregate(session.layout, &vectors, vec![1, 2, 3]), &names).unwrap();
        assert_eq!(totals.groups.len(), 2);
        assert_eq!((totals.groups[0].1, totals.groups[0].2.examples, totals.groups[0].2.correct), (3, 18, 15));
        // One device's masked sums missing: no group keeps three members' sums.
        let two = session.totals(&aggregate(session.layout, &vectors[..2], vec![1, 2]), &names).unwrap();
        assert!(two.groups.is_empty());
        // A device that claims more correct than it scored, or reports twice over, is caught in the total.
        let mut lie = vectors.clone();
        lie[0][3 * 5] += 100.0; // the first block's `correct`
        let refused = session.totals(&aggregate(session.layout, &lie, vec![1, 2, 3]), &names).unwrap_err();
        assert!(refused.contains("do not add up"), "{refused}");
        let mut twice = vectors.clone();
        twice[0][0] += 1.0; // `reporting`
        let refused = session.totals(&aggregate(session.layout, &twice, vec![1, 2, 3]), &names).unwrap_err();
        assert!(refused.contains("report(s)"), "{refused}");
    }
}
