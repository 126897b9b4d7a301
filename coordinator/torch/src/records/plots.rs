//! The run's plots, redrawn after every round: test accuracy per round (global model at R_max and
//! each rank's slice) and participation per round (accepted updates by rank). PNG and SVG; text
//! uses an embedded DejaVu Sans, so no system fonts are needed.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::records::report::ReportRow;

const SIZE: (u32, u32) = (900, 520);
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded font is invalid"));
    });
    result
}

#[derive(Clone, Copy)]
enum Chart {
    Accuracy,
    Participation,
}

/// Writes accuracy.{png,svg} and participation.{png,svg} into `dir`.
pub fn draw(dir: &Path, rows: &[ReportRow]) -> Result<()> {
    register_font()?;
    if rows.is_empty() {
        return Ok(());
    }
    let with_accuracy = rows.iter().any(|r| r.accuracy.is_some() || federated_accuracy(r).is_some());
    for ext in ["png", "svg"] {
        if with_accuracy {
            render(&dir.join(format!("accuracy.{ext}")), Chart::Accuracy, rows)?;
        }
        render(&dir.join(format!("participation.{ext}")), Chart::Participation, rows)?;
    }
    Ok(())
}

fn chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: Chart, rows: &[ReportRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    match chart {
        Chart::Accuracy => accuracy_chart(area, rows),
        Chart::Participation => participation_chart(area, rows),
    }
}

/// Draws into a temporary file and renames it into place, so a reader never sees half a plot.
fn render(path: &Path, which: Chart, rows: &[ReportRow]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tmp = path.with_extension(format!("tmp.{ext}"));
    if ext == "svg" {
        let area = SVGBackend::new(&tmp, SIZE).into_drawing_area();
        chart(&area, which, rows)?;
        area.present().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    } else {
        let area = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        chart(&area, which, rows)?;
        area.present().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    flotilla_wire::files::commit(&tmp, path).map_err(|e| anyhow!("{}: {e}", path.display()))
}

type Chart2d<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart2d<'a, DB>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
}

fn rounds_range(rows: &[ReportRow]) -> std::ops::Range<f64> {
    let first = rows.first().map_or(0, |r| r.round) as f64;
    let last = rows.last().map_or(1, |r| r.round) as f64;
    first..last.max(first + 1.0)
}

fn accuracy_chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, rows: &[ReportRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    area.fill(&WHITE).map_err(err)?;
    let values: Vec<f64> =
        rows.iter().flat_map(|r| r.accuracy_by_rank.values().copied().chain(federated_accuracy(r))).collect();
    let low = values.iter().copied().fold(1.0f64, f64::min);
    let high = values.iter().copied().fold(0.0f64, f64::max);
    let pad = ((high - low) * 0.1).max(0.01);
    let mut chart = ChartBuilder::on(area)
        .caption("Accuracy of the global model per round", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(rounds_range(rows), (low - pad).max(0.0)..(high + pad).min(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("round (0 = before training)")
        .x_labels(rows.len().clamp(2, 16))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("accuracy")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let ranks: BTreeSet<usize> = rows.iter().flat_map(|r| r.accuracy_by_rank.keys().copied()).collect();
    let max_rank = ranks.iter().copied().max().unwrap_or(0);
    for (i, &rank) in ranks.iter().enumerate() {
        let points: Vec<(f64, f64)> =
            rows.iter().filter_map(|r| r.accuracy_by_rank.get(&rank).map(|&a| (r.round as f64, a))).collect();
        let color = Palette99::pick(i).to_rgba();
        let width = if rank == max_rank { 3 } else { 1 };
        let label = if rank == max_rank { format!("rank {rank} (R_max, global)") } else { format!("rank {rank}") };
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(width)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
    }
    let federated: Vec<(f64, f64)> =
        rows.iter().filter_map(|r| Some((r.round as f64, federated_accuracy(r)?))).collect();
    if !federated.is_empty() {
        chart
            .draw_series(LineSeries::new(federated.clone(), BLACK.stroke_width(2)))
            .map_err(err)?
            .label("federated: the devices' own held-out data")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        let square = |(x, y): (f64, f64)| Rectangle::new([(x, y), (x, y)], BLACK.stroke_width(6));
        chart.draw_series(federated.iter().map(|&p| square(p))).map_err(err)?;
    }
    draw_legend(&mut chart).map_err(err)
}

/// The round's model on the devices' held-out data, overall (`[federated_evaluation]`).
fn federated_accuracy(row: &ReportRow) -> Option<f64> {
    Some(row.federated.as_ref()?.overall.as_ref()?.accuracy)
}

fn participation_chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, rows: &[ReportRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    area.fill(&WHITE).map_err(err)?;
    let rows: Vec<&ReportRow> = rows.iter().filter(|r| r.round > 0).collect();
    let most = rows.iter().map(|r| r.updates).max().unwrap_or(1).max(1);
    let first = rows.first().map_or(1, |r| r.round) as f64;
    let last = rows.last().map_or(1, |r| r.round) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption("Accepted updates per round, by rank", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(first - 0.5..last + 0.5, 0.0..(most as f64 * 1.15))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .x_labels(rows.len().clamp(2, 16))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("updates")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let ranks: BTreeSet<u32> = rows.iter().flat_map(|r| r.participants.keys().copied()).collect();
    let total: Vec<(f64, f64)> = rows.iter().map(|r| (r.round as f64, r.updates as f64)).collect();
    chart
        .draw_series(LineSeries::new(total, BLACK.stroke_width(2)))
        .map_err(err)?
        .label("all ranks")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    for (i, &rank) in ranks.iter().enumerate() {
        let points: Vec<(f64, f64)> =
            rows.iter().map(|r| (r.round as f64, r.participants.get(&rank).copied().unwrap_or(0) as f64)).collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(1)))
            .map_err(err)?
            .label(format!("rank {rank}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
    }
    draw_legend(&mut chart).map_err(err)
}
