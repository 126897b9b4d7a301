//! A round that ends without a new global adapter: why, in the log, the metrics and the reports,
//! and what it costs (under `[privacy]` a skipped round was still sampled).

use std::collections::BTreeMap;

use flotilla_engine::SkipWhy;

/// Why a device left, as it said in its close: recorded as a count per cause in a skipped
/// round's reason (no device ids, which records under SecAgg or `[privacy]` must not hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Departure {
    RefusedTask,
    DataUnusable,
}

impl Departure {
    /// The departure a device's close code states, if it states one.
    pub fn of_close_code(code: u64) -> Option<Departure> {
        use flotilla_wire::protocol::close;
        match code {
            code if code == u64::from(close::REFUSED_TASK) => Some(Departure::RefusedTask),
            code if code == u64::from(close::DATA_UNUSABLE) => Some(Departure::DataUnusable),
            _ => None,
        }
    }

    /// A bounded label for `fl_sessions_closed_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Departure::RefusedTask => "task_refused",
            Departure::DataUnusable => "data_unusable",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Departure::RefusedTask => "refused its round task",
            Departure::DataUnusable => "cannot use its own data",
        }
    }
}

/// Why round `round` ends without a new global adapter: the engine's reason, the reason it could
/// not run (`cannot_run`), or its shortfall with the causes its participants gave for leaving.
pub(super) fn skip_reason(
    why: &SkipWhy,
    updates: usize,
    min_updates: usize,
    cannot_run: Option<String>,
    departures: Option<&BTreeMap<Departure, usize>>,
) -> String {
    match (why, cannot_run) {
        (SkipWhy::DrawRefused(reason), _) => format!("{reason}; no task was sent"),
        (SkipWhy::ShortOfQuorum, Some(reason)) => reason,
        (SkipWhy::ShortOfQuorum, None) => {
            let mut reason = format!("{updates} update(s) by the deadline, short of the quorum of {min_updates}");
            if let Some(departures) = departures {
                let causes: Vec<String> =
                    departures.iter().map(|(why, n)| format!("{n} participant(s) {}", why.describe())).collect();
                reason += &format!(" ({} and left)", causes.join(", "));
            }
            reason
        }
    }
}
