//! The aggregation methods: one row per method ([`MethodSpec`]) holding its name and everything the
//! system decides by method (what a device is sent, whether it needs the previous global, its
//! divisor on the fast path, under secure aggregation and under privacy, or why it cannot run
//! there). The configuration, both paths of the offline `aggregate` command, the reports, the
//! metrics and the errors read the row.

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

/// How the global adapter reaches a device of rank r.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Its first r slots.
    Slice,
    /// The whole R_max adapter: the device folds the slots above r into its frozen weight
    /// (Fold-and-Fill).
    WholeWithFoldedTail,
}

/// Everything the system decides by method, in one row per method: a new method is one row here
/// and one file in `flotilla_torch::aggregate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodSpec {
    pub method: Method,
    pub name: &'static str,
    /// One line for help texts and error messages.
    pub summary: &'static str,
    pub delivery: Delivery,
    /// It aggregates against the previous global adapter (so the offline `aggregate`, which has
    /// none, cannot run it).
    pub needs_previous_global: bool,
    /// The slot-wise methods that average sample-weighted, zero-padded factors: what each slot's
    /// sum is divided by. They run without libtorch on the offline fast path.
    pub fast_path: Option<Denominator>,
    /// Under secure aggregation, the divisor of its slot sums; or why it cannot run on sums.
    pub secure: Result<Denominator, &'static str>,
    /// Under differential privacy, the divisor of its noised sums (there the expected count of
    /// sampled devices that cover the slot, or of all sampled devices); or why it cannot run.
    pub private: Result<Denominator, &'static str>,
}

const NEEDS_UPDATES_FLORA: &str = "FLoRA stacks the individual updates";
const NEEDS_UPDATES_FLEXLORA: &str = "FlexLoRA needs each device's product B·A, not sums of factors";

/// The methods, in [`Method::ALL`]'s order.
const SPECS: [MethodSpec; 8] = [
    MethodSpec {
        method: Method::Rbla,
        name: "rbla",
        summary: "rank-based LoRA aggregation: each slot averaged over the devices that hold it",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: Some(Denominator::Coverage),
        secure: Ok(Denominator::Coverage),
        private: Ok(Denominator::Coverage),
    },
    MethodSpec {
        method: Method::ZeroPad,
        name: "zero-pad",
        summary: "each slot averaged over every device, missing slots counted as zeros",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: Some(Denominator::AllClients),
        secure: Ok(Denominator::AllClients),
        private: Err("zero-pad averages the values devices received as well as their changes, so one device's \
                      presence moves a slot by g/N whatever the clipping bound"),
    },
    MethodSpec {
        method: Method::HetLora,
        name: "hetlora",
        summary: "zero-padding weighted by each update's norm (HetLoRA)",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: None,
        secure: Err("HetLoRA weighs each update by its own norm, which needs the update itself"),
        private: Err("HetLoRA weighs each update by its own norm, which the sums do not bound"),
    },
    MethodSpec {
        method: Method::FlexLora,
        name: "flexlora",
        summary: "the products B·A averaged and split again by SVD (FlexLoRA)",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: None,
        secure: Err(NEEDS_UPDATES_FLEXLORA),
        private: Err(NEEDS_UPDATES_FLEXLORA),
    },
    MethodSpec {
        method: Method::Flora,
        name: "flora",
        summary: "the updates stacked into one exact sum, merged into the global (FLoRA)",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: None,
        secure: Err(NEEDS_UPDATES_FLORA),
        private: Err(NEEDS_UPDATES_FLORA),
    },
    MethodSpec {
        method: Method::FedAvg,
        name: "fedavg",
        summary: "plain federated averaging, every device at the same rank",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: Some(Denominator::Coverage),
        secure: Ok(Denominator::Coverage),
        private: Ok(Denominator::Coverage),
    },
    MethodSpec {
        method: Method::FoldAndFill,
        name: "fold-and-fill",
        summary: "every device gets the whole adapter, the slots above its rank folded in; a slot a device \
                  lacks counts with the previous global value",
        delivery: Delivery::WholeWithFoldedTail,
        needs_previous_global: true,
        // It fills from the previous global adapter, which the fast path does not have.
        fast_path: None,
        secure: Ok(Denominator::AllClientsFilled),
        private: Ok(Denominator::AllClientsFilled),
    },
    MethodSpec {
        method: Method::RblaCoverage,
        name: "rbla-coverage",
        summary: "RBLA with each slot's product scaled by the share of the weight that covers it",
        delivery: Delivery::Slice,
        needs_previous_global: false,
        fast_path: Some(Denominator::CoverageScaled),
        secure: Err("coverage-scaled RBLA is not given a sums form yet (its scaling needs only the coverage, so \
                     it could be)"),
        private: Err("coverage-scaled RBLA scales by the sampled coverage, which depends on who took part"),
    },
];

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

    /// The method's row.
    pub fn spec(self) -> &'static MethodSpec {
        // `SPECS` is in the declaration order of the variants (checked by a test).
        &SPECS[self as usize]
    }

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
        self.spec().name
    }

    /// Whether a device of rank r < R_max gets the rest of the global adapter folded into its
    /// frozen weight (`s·B_g[:, r:]·A_g[r:, :]`) with its slice (Fold-and-Fill).
    pub fn folds_tail(self) -> bool {
        self.spec().delivery == Delivery::WholeWithFoldedTail
    }

    /// Whether the method needs the previous global adapter to aggregate.
    pub fn needs_previous_global(self) -> bool {
        self.spec().needs_previous_global
    }

    /// For the methods on the offline fast path, what each slot's sum is divided by.
    pub fn sample_weighted_denominator(self) -> Option<Denominator> {
        self.spec().fast_path
    }

    /// The methods for which `keep` holds, by name, for help texts and errors: "a, b or c".
    pub fn names_where(keep: impl Fn(&MethodSpec) -> bool) -> String {
        let names: Vec<&str> = SPECS.iter().filter(|s| keep(s)).map(|s| s.name).collect();
        match names.split_last() {
            None => String::new(),
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
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

    #[test]
    fn every_method_has_its_own_row_in_order() {
        for (spec, method) in SPECS.iter().zip(Method::ALL) {
            assert_eq!(spec.method, method);
            assert_eq!(method.spec().method, method);
        }
        assert_eq!(Method::names_where(|s| s.secure.is_ok()), "rbla, zero-pad, fedavg or fold-and-fill");
        assert_eq!(Method::names_where(|s| s.private.is_ok()), "rbla, fedavg or fold-and-fill");
        assert_eq!(Method::names_where(|s| s.method == Method::Flora), "flora");
        // Only Fold-and-Fill sends the whole adapter, and it is the one that needs the previous global.
        for spec in SPECS {
            assert_eq!(spec.delivery == Delivery::WholeWithFoldedTail, spec.needs_previous_global, "{}", spec.name);
        }
    }
}
