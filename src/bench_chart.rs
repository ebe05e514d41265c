//! The chart of `tally bench sweep`: one SVG, two panels over the same
//! x axis (the points in plan order, grouped by acks level, each group
//! named above it and each point labelled with its record size and
//! partitions):
//! - throughput in MB/s, one bar per point, coloured by record size;
//! - produce latency p50, p99 and p99.9 per point, log scale, one line per
//!   percentile within each acks group.
//!
//! Drawn with `plotters`' SVG backend alone: without its `ttf` feature it
//! estimates text sizes itself and writes text as SVG `<text>` elements,
//! so labels render in any browser and no system font library is needed.

use plotters::coord::Shift;
use plotters::coord::ranged1d::{SegmentValue, SegmentedCoord};
use plotters::coord::types::RangedCoordi32;
use plotters::prelude::*;

use crate::bench_sweep::{PointResult, size_label};

/// Width of the chart in pixels.
pub const WIDTH: u32 = 1200;
/// Height of the chart in pixels (both panels).
pub const HEIGHT: u32 = 920;
/// Series names of the latency panel, in order.
pub const LATENCY_SERIES: [&str; 3] = ["p50", "p99", "p99.9"];

const FONT: &str = "sans-serif";

/// The chart of `results` as an SVG document, titled `title`, with
/// `footer` (the machine, say) in small type along the bottom.
pub fn render_svg(results: &[PointResult], title: &str, footer: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!results.is_empty(), "no result to chart");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let footer_y = i32::try_from(HEIGHT).unwrap_or(i32::MAX) - 18;
        root.draw(&Text::new(footer, (12, footer_y), (FONT, 13).into_font().color(&RGBColor(90, 90, 90))))
            .map_err(draw_error)?;
        let root = root.margin(0, 22, 0, 0).titled(title, (FONT, 20)).map_err(draw_error)?;
        let (top, bottom) = root.split_vertically(HEIGHT / 2 - 20);
        let layout = Layout::of(results);
        throughput_panel(&top, results, &layout)?;
        latency_panel(&bottom, results, &layout)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// plotters' errors borrow nothing but are not all `Send + Sync`: keep the text.
fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {e}")
}

/// What both panels share: the points' tick labels, the acks groups as
/// runs of consecutive points, and the record sizes in order (for colours).
struct Layout {
    ticks: Vec<String>,
    groups: Vec<(String, std::ops::Range<i32>)>,
    sizes: Vec<usize>,
}

impl Layout {
    fn of(results: &[PointResult]) -> Layout {
        let ticks = results
            .iter()
            .map(|r| format!("{} {}p", size_label(r.point.record_size).replace(' ', ""), r.point.partitions))
            .collect();
        let mut groups: Vec<(String, std::ops::Range<i32>)> = Vec::new();
        for (i, r) in (0i32..).zip(results) {
            let name = r.point.acks_group();
            match groups.last_mut() {
                Some((last, range)) if *last == name => range.end = i + 1,
                _ => groups.push((name, i..i + 1)),
            }
        }
        let mut sizes: Vec<usize> = results.iter().map(|r| r.point.record_size).collect();
        sizes.sort();
        sizes.dedup();
        Layout { ticks, groups, sizes }
    }

    fn points(&self) -> i32 {
        i32::try_from(self.ticks.len()).unwrap_or(i32::MAX)
    }

    fn tick(&self, v: &SegmentValue<i32>) -> String {
        match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                usize::try_from(*i).ok().and_then(|i| self.ticks.get(i)).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        }
    }
}

/// Colours of the record sizes and of the percentiles.
fn colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    COLOURS[i % COLOURS.len()]
}

fn throughput_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    results: &[PointResult],
    layout: &Layout,
) -> anyhow::Result<()> {
    let top = results.iter().map(|r| r.mb_per_s).fold(0.0, f64::max).max(0.001) * 1.3;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput by acks level and record size", (FONT, 16))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0..layout.points()).into_segmented(), 0f64..top)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(layout.ticks.len())
        .x_label_formatter(&|v| layout.tick(v))
        .x_desc("record size, partitions")
        .y_desc("MB/s (record values)")
        .draw()
        .map_err(draw_error)?;
    for (ci, &size) in layout.sizes.iter().enumerate() {
        let style = colour(ci).filled();
        let bars = (0i32..).zip(results).filter(|(_, r)| r.point.record_size == size).map(|(i, r)| (i, r.mb_per_s));
        chart
            .draw_series(Histogram::vertical(&chart).style(style).margin(4).data(bars))
            .map_err(draw_error)?
            .label(size_label(size))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], style));
    }
    finish_panel(&mut chart, layout, top * 0.97)
}

fn latency_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    results: &[PointResult],
    layout: &Layout,
) -> anyhow::Result<()> {
    let values: Vec<Option<[f64; 3]>> =
        results.iter().map(|r| r.produce_latency_ms.map(|p| [p.p50, p.p99, p.p99_9])).collect();
    let all = values.iter().flatten().flatten().copied().filter(|v| *v > 0.0);
    let (low, high) = all.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = if high > 0.0 { (low / 2.0, high * 8.0) } else { (0.01, 10.0) };
    let mut chart = ChartBuilder::on(area)
        .caption("Produce latency (send to acknowledgement) by acks level", (FONT, 16))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0..layout.points()).into_segmented(), (low..high).log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(layout.ticks.len())
        .x_label_formatter(&|v| layout.tick(v))
        .y_label_formatter(&|v| format!("{v}"))
        .x_desc("record size, partitions")
        .y_desc("ms (log scale)")
        .draw()
        .map_err(draw_error)?;
    for (k, name) in LATENCY_SERIES.iter().enumerate() {
        let style = colour(k + 3).stroke_width(2);
        let mut labelled = false;
        for (_, range) in &layout.groups {
            let line: Vec<(SegmentValue<i32>, f64)> = range
                .clone()
                .filter_map(|i| {
                    let v = values.get(usize::try_from(i).ok()?).copied().flatten()?[k];
                    (v > 0.0).then_some((SegmentValue::CenterOf(i), v))
                })
                .collect();
            if line.is_empty() {
                continue;
            }
            let series = chart.draw_series(LineSeries::new(line, style).point_size(3)).map_err(draw_error)?;
            if !labelled {
                series.label(*name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], style));
                labelled = true;
            }
        }
    }
    finish_panel(&mut chart, layout, high / 1.3)
}

/// Ends a panel: the acks groups, each named at its left edge at height
/// `label_y` with a grey line between groups, and the legend.
fn finish_panel<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<SegmentedCoord<RangedCoordi32>, Y>>,
    layout: &Layout,
    label_y: Y::ValueType,
) -> anyhow::Result<()>
where
    Y: Ranged,
    Y::ValueType: Clone + 'static,
{
    let std::ops::Range { start: y_low, end: y_high } = chart.y_range();
    for (name, range) in &layout.groups {
        let x = SegmentValue::Exact(range.start);
        if range.start > 0 {
            let line = vec![(x.clone(), y_low.clone()), (x.clone(), y_high.clone())];
            chart.draw_series(std::iter::once(PathElement::new(line, RGBColor(150, 150, 150)))).map_err(draw_error)?;
        }
        let text = Text::new(name.clone(), (x, label_y.clone()), (FONT, 14).into_font().color(&BLACK));
        chart.draw_series(std::iter::once(text)).map_err(draw_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(draw_error)?;
    Ok(())
}
