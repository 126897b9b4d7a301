//! The aggregation methods by name: the one table of names that the configuration, both paths of
//! the offline `aggregate` command, the reports and the metrics use.

use std::fmt;
use std::str::FromStr;

use crate::slots::Denominator;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Rbla,
    ZeroPad,
    #[serde(rename = "hetlora")]
    HetLora,
    #[serde(rename = "flexlora")]
    FlexLora,
    Flora,
    #[serde(rename = "fedavg")]
    FedAvg,
    FoldAndFill,
    RblaCoverage,
}

impl Method {
    /// `serve`'s method when `[aggregation] method` is not set: the one issue 15's rule picks from
    /// the study (`flotilla-study --choose-default`: the best mean gain recovered over the study's
    /// cells, with no rank's slice ending below the base in any cell; docs/study.md).
    pub const DEFAULT: Method = Method::FoldAndFill;

    pub const ALL: [Method; 8] = [
        Method::Rbla,
        Method::ZeroPad,
        Method::HetLora,
        Method::FlexLora,
        Method::Flora,
        Method::FedAvg,
        Method::FoldAndFill,
        Method::RblaCoverage,
    ];

    /// " (the default)" for [`Method::DEFAULT`], so that an error about the method tells a user who
    /// never wrote it where it came from; "" for the others.
    pub fn default_note(self) -> &'static str {
        if self == Method::DEFAULT {
            " (the default)"
        } else {
            ""
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Rbla => "rbla",
            Method::ZeroPad => "zero-pad",
            Method::HetLora => "hetlora",
            Method::FlexLora => "flexlora",
            Method::Flora => "flora",
            Method::FedAvg => "fedavg",
            Method::FoldAndFill => "fold-and-fill",
            Method::RblaCoverage => "rbla-coverage",
        }
    }

    /// Whether a device of rank r < R_max gets the rest of the global adapter folded into its
    /// frozen weight (`s·B_g[:, r:]·A_g[r:, :]`) with its slice (Fold-and-Fill).
    pub fn folds_tail(self) -> bool {
        self == Method::FoldAndFill
    }

    /// Whether the method needs the previous global adapter to aggregate (so the offline
    /// `aggregate`, which has none, cannot run it).
    pub fn needs_previous_global(self) -> bool {
        self == Method::FoldAndFill
    }

    /// For the methods that average sample-weighted, zero-padded factors slot by slot (RBLA,
    /// zero-padding, FedAvg, coverage-scaled RBLA), what each slot's sum is divided by; they run without libtorch on the
    /// offline fast path. `None` for the methods that need libtorch.
    pub fn sample_weighted_denominator(self) -> Option<Denominator> {
        match self {
            Method::Rbla | Method::FedAvg => Some(Denominator::Coverage),
            Method::ZeroPad => Some(Denominator::AllClients),
            Method::RblaCoverage => Some(Denominator::CoverageScaled),
            // Fold-and-Fill fills from the previous global adapter, which the fast path does not have.
            Method::HetLora | Method::FlexLora | Method::Flora | Method::FoldAndFill => None,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
            format!("unknown aggregation method '{s}' (known: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{}\"", m.name()));
        }
        assert!("nope".parse::<Method>().unwrap_err().contains("known: rbla, zero-pad"));
        let fast: Vec<_> = Method::ALL.into_iter().filter(|m| m.sample_weighted_denominator().is_some()).collect();
        assert_eq!(fast, [Method::Rbla, Method::ZeroPad, Method::FedAvg, Method::RblaCoverage]);
    }
}
