//! The default-method rule's tables read back from a document the study generated
//! (`flotilla-study --choose-default --from-doc docs/study.md`).
//!
//! Each suite's generated block ends with its side of the rule (see `report::rule_section`),
//! written from that suite's cache when the block was generated. Reading the tables back lets the
//! rule combine suites whose caches are not on this machine: a suite's mean gain over its k cells
//! stands for those k cells, so the combined mean weighs every cell alike, as it does when the
//! caches are read.

use anyhow::{bail, Context, Result};

use super::report::{Standing, RULE_HEADING};
use super::Plan;

/// Every method's standing in `plan`'s suite, as its generated block in `doc` records it.
pub fn standings_from_doc(plan: &Plan, doc: &str) -> Result<Vec<Standing>> {
    let (begin, end) = (plan.begin_marker(), plan.end_marker());
    let block = doc
        .split_once(begin.as_str())
        .and_then(|(_, rest)| rest.split_once(end.as_str()))
        .map(|(block, _)| block)
        .with_context(|| format!("the document has no generated block for --suite {}", plan.suite))?;
    let (_, rule) = block
        .split_once(RULE_HEADING)
        .with_context(|| format!("--suite {}'s block has no default-method rule table", plan.suite))?;
    // The rule's table ends where the next section (the pairwise comparison) begins.
    let rule = rule.split("\n#### ").next().unwrap_or(rule);
    let mut out = Vec::new();
    for line in rule.lines().map(str::trim).filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [name, measured, mean, worst] = cells[..] else {
            bail!("--suite {}: a rule table row without 4 columns: {line}", plan.suite)
        };
        let Some((measured, of)) = measured.split_once(" of ") else { continue }; // the header rows
        let method = plan.methods.iter().copied().find(|m| *m == name).with_context(|| {
            format!("--suite {}: the rule table names {name:?}, not a method of the suite", plan.suite)
        })?;
        let number = |text: &str, what: &str| -> Result<Option<f64>> {
            if text == "—" {
                return Ok(None);
            }
            text.parse::<f64>().map(Some).with_context(|| format!("--suite {}, {name}: {what} {text:?}", plan.suite))
        };
        let measured: usize =
            measured.parse().with_context(|| format!("--suite {}, {name}: cells {line}", plan.suite))?;
        let cells: usize = of.parse().with_context(|| format!("--suite {}, {name}: cells {line}", plan.suite))?;
        let gains = match number(mean, "mean gain")? {
            Some(mean) => vec![mean; measured],
            None if measured == 0 => Vec::new(),
            None => bail!("--suite {}, {name}: {measured} cells measured but no mean gain", plan.suite),
        };
        out.push(Standing { method, gains, worst_slice_minus_floor: number(worst, "worst slice")?, cells });
    }
    if out.is_empty() {
        bail!("--suite {}: its default-method rule table has no rows", plan.suite);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::second::report::rule_table;

    fn block(plan: &Plan, table: &str) -> String {
        format!(
            "intro\n{}\n### x\n\n{RULE_HEADING}\n\n{table}\nBy this suite alone…\n\n{}\nafter\n",
            plan.begin_marker(),
            plan.end_marker()
        )
    }

    #[test]
    fn a_generated_rule_table_reads_back_as_the_standings_it_was_written_from() {
        let plan = Plan::text();
        let written = vec![
            Standing { method: "rbla", gains: vec![0.5, 0.7], worst_slice_minus_floor: Some(-1.5), cells: 2 },
            Standing { method: "flora", gains: vec![0.9], worst_slice_minus_floor: Some(3.0), cells: 2 },
            Standing { method: "zero-pad", gains: Vec::new(), worst_slice_minus_floor: None, cells: 2 },
        ];
        let read = standings_from_doc(&plan, &block(&plan, &rule_table(&written))).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!((read[0].method, read[0].gains.clone(), read[0].cells), ("rbla", vec![0.6, 0.6], 2));
        assert_eq!(read[0].worst_slice_minus_floor, Some(-1.5));
        assert_eq!((read[1].gains.clone(), read[1].cells), (vec![0.9], 2));
        assert!(read[2].gains.is_empty() && read[2].worst_slice_minus_floor.is_none());
    }

    #[test]
    fn a_document_without_the_suite_or_with_a_foreign_method_is_an_error() {
        let plan = Plan::text();
        let err = standings_from_doc(&plan, "no blocks here").unwrap_err();
        assert!(err.to_string().contains("no generated block for --suite text"), "{err}");
        let foreign = "| method | cells measured | mean gain recovered | lowest worst slice − base (points) |\n|---|---|---|---|\n| magic | 2 of 2 | 0.990 | +1.0 |\n";
        let err = standings_from_doc(&plan, &block(&plan, foreign)).unwrap_err();
        assert!(err.to_string().contains("\"magic\""), "{err}");
        let other_suite = block(&Plan::image_shift(), foreign);
        assert!(standings_from_doc(&plan, &other_suite).is_err());
    }
}
