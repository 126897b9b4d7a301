//! The device's held-out data for federated evaluation: a seeded, stratified share of its own
//! data that it never trains on (or a data set of its own given apart), set aside only when the
//! coordinator's run evaluates on devices. What it scores there leaves the device as sums only.

use std::path::PathBuf;

/// How this device holds data out for the coordinator's federated evaluation.
#[derive(clap::Args, Debug, Clone)]
pub struct HeldOutArgs {
    /// Share of the local data set apart for federated evaluation (a seeded sample stratified by
    /// label, never trained on) when the coordinator's run evaluates on devices.
    #[arg(long, default_value_t = 0.15, value_parser = parse_fraction)]
    pub holdout_fraction: f64,
    /// Held-out data of its own instead of a share of --data (the same formats; an IDX directory's
    /// training files, a text set's training split): all of --data is then trained on.
    #[arg(long, conflicts_with_all = ["no_evaluation", "holdout_test_split"])]
    pub holdout_data: Option<PathBuf>,
    /// Hold out this device's shard (the same --partition) of the --data set's test split (an IDX
    /// directory's t10k files, a text set's stable test split) instead of a share of its training
    /// data: all of the training shard is then trained on. For trials on public data sets.
    #[arg(long, conflicts_with = "no_evaluation")]
    pub holdout_test_split: bool,
    /// Decline the coordinator's evaluation requests (the coordinator counts the refusal); no data
    /// is held out.
    #[arg(long)]
    pub no_evaluation: bool,
}

impl HeldOutArgs {
    pub fn choice(&self) -> HeldOut {
        if self.no_evaluation {
            HeldOut::Declined("evaluation is turned off on this device (--no-evaluation)".into())
        } else if self.holdout_test_split {
            HeldOut::TestSplit
        } else if let Some(path) = &self.holdout_data {
            HeldOut::Data(path.clone())
        } else if self.holdout_fraction > 0.0 {
            HeldOut::Share(self.holdout_fraction)
        } else {
            HeldOut::Declined("this device holds no data out (--holdout-fraction 0)".into())
        }
    }
}

/// What a device holds out when its run evaluates on devices.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldOut {
    /// This share of its data (in (0, 1)).
    Share(f64),
    /// A data set of its own.
    Data(PathBuf),
    /// Its shard of the data set's test split.
    TestSplit,
    /// Nothing: the device declines evaluation, for this reason.
    Declined(String),
}

impl Default for HeldOut {
    fn default() -> Self {
        HeldOut::Share(0.15)
    }
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("'{text}' is not a number"))?;
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not in [0, 1): a device must keep data to train on"))
    }
}

/// Splits examples with `labels` into (training, held-out) indices: `fraction` of each label's
/// examples (rounded, at least one example in all when there are two or more) held out, chosen
/// by a seeded stable hash, so the same data gives the same split on every run.
pub fn split(labels: &[usize], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let n = labels.len();
    let wanted = ((n as f64 * fraction).round() as usize).clamp(usize::from(n >= 2), n.saturating_sub(1));
    let keys: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let mut held: Vec<usize> = flotilla_data::sample::stratified(labels, &keys, wanted, seed);
    held.sort_unstable();
    let mut is_held = vec![false; n];
    held.iter().for_each(|&i| is_held[i] = true);
    let training = (0..n).filter(|&i| !is_held[i]).collect();
    (training, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_is_stratified_seeded_and_disjoint() {
        let labels: Vec<usize> = (0..200).map(|i| if i < 150 { 0 } else { 1 }).collect();
        let (training, held) = split(&labels, 0.2, 9);
        assert_eq!(held.len(), 40);
        assert_eq!(training.len() + held.len(), 200);
        assert!(held.iter().all(|i| training.binary_search(i).is_err()));
        let ones = held.iter().filter(|&&i| labels[i] == 1).count();
        assert_eq!(ones, 10, "a quarter of the examples are label 1, so a quarter of the held-out set");
        assert_eq!(split(&labels, 0.2, 9), (training, held.clone()));
        assert_ne!(split(&labels, 0.2, 10).1, held);
    }

    #[test]
    fn a_tiny_data_set_keeps_something_to_train_on() {
        assert_eq!(split(&[0, 1], 0.01, 1).1.len(), 1);
        assert_eq!(split(&[0, 1], 0.99, 1).0.len(), 1);
        assert_eq!(split(&[0], 0.5, 1), (vec![0], vec![]));
    }

    #[test]
    fn the_flags_choose_what_is_held_out() {
        let args = |fraction: f64, data: Option<&str>, off: bool| HeldOutArgs {
            holdout_fraction: fraction,
            holdout_data: data.map(PathBuf::from),
            holdout_test_split: false,
            no_evaluation: off,
        };
        let test_split = HeldOutArgs { holdout_test_split: true, ..args(0.15, None, false) };
        assert_eq!(test_split.choice(), HeldOut::TestSplit);
        assert_eq!(args(0.15, None, false).choice(), HeldOut::Share(0.15));
        assert_eq!(args(0.15, Some("/h"), false).choice(), HeldOut::Data(PathBuf::from("/h")));
        assert!(matches!(args(0.0, None, false).choice(), HeldOut::Declined(_)));
        assert!(matches!(args(0.15, None, true).choice(), HeldOut::Declined(_)));
        assert!(parse_fraction("1").is_err() && parse_fraction("-0.1").is_err() && parse_fraction("x").is_err());
        assert_eq!(parse_fraction("0.2"), Ok(0.2));
    }
}
