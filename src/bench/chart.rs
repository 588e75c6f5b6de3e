//! The convergence chart: distance to the reference against model evaluations (NFE), one line per scheduler, drawn
//! with plotters' bitmap backend and the bundled font (no system font lookup).

use image::RgbImage;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::text::{register_plotters_font, PLOTTERS_FAMILY};
use crate::{Error, Result};

/// Size of the chart image.
pub const CHART_WIDTH: u32 = 1200;
pub const CHART_HEIGHT: u32 = 520;

/// One scheduler's line: (NFE, value) points in NFE order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of the chart.
pub struct Panel<'a> {
    pub caption: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    /// Where the legend goes: the corner the lines are least likely to be in.
    pub legend: SeriesLabelPosition,
    /// Whether the y axis starts at 0 (distances such as RMSE) rather than just under the smallest value.
    pub from_zero: bool,
}

/// The chart's file name in the benchmark's output folder.
pub const FILE_NAME: &str = "convergence.png";

fn drawing_error(e: impl std::fmt::Display) -> Error {
    Error::output(FILE_NAME, format!("drawing the convergence chart: {e}"))
}

/// Draws the panels side by side under `title`.
pub fn convergence_chart(title: &str, panels: &[Panel]) -> Result<RgbImage> {
    register_plotters_font();
    let (w, h) = (CHART_WIDTH, CHART_HEIGHT);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error)?;
        let root = root.titled(title, (PLOTTERS_FAMILY, 22)).map_err(drawing_error)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(drawing_error)?;
    }
    RgbImage::from_raw(w, h, buffer).ok_or_else(|| drawing_error("the pixel buffer does not match the chart's size"))
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, panel: &Panel) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points = || panel.series.iter().flat_map(|s| s.points.iter().copied());
    let x_max = points().map(|p| p.0).fold(1.0f64, f64::max) * 1.05;
    let (mut y_min, mut y_max) =
        points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.08).max(y_max.abs() * 0.05).max(1e-3);
    let y_low = if panel.from_zero || (y_min >= 0.0 && y_min - pad < 0.0) { 0.0 } else { y_min - pad };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(panel.caption, (PLOTTERS_FAMILY, 17))
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, y_low..y_max + pad)
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .x_desc("model evaluations (NFE)")
        .y_desc(panel.y_label)
        .label_style((PLOTTERS_FAMILY, 13))
        .axis_desc_style((PLOTTERS_FAMILY, 15))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .max_light_lines(1)
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(drawing_error)?;
    if panel.series.iter().all(|s| s.points.is_empty()) {
        chart
            .draw_series(std::iter::once(Text::new(
                "no finite values",
                (x_max * 0.35, (y_low + y_max + pad) / 2.0),
                (PLOTTERS_FAMILY, 15),
            )))
            .map_err(drawing_error)?;
        return Ok(());
    }
    for (i, series) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line = color.stroke_width(2);
        // Every other line is dashed, so that lines lying on top of each other stay visible.
        let (dash, gap) = if i % 2 == 1 { (6, 4) } else { (1000, 1) };
        let drawn = if i % 2 == 1 {
            chart.draw_series(DashedLineSeries::new(series.points.iter().copied(), dash, gap, line))
        } else {
            chart.draw_series(LineSeries::new(series.points.iter().copied(), line))
        };
        drawn
            .map_err(drawing_error)?
            .label(series.name.as_str())
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 22, y)], dash, gap, line));
        chart.draw_series(series.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(drawing_error)?;
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font((PLOTTERS_FAMILY, 13))
        .draw()
        .map_err(drawing_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_lines_and_text() {
        let series = vec![
            Series { name: "Euler".into(), points: vec![(10.0, 0.3), (20.0, 0.2), (30.0, 0.1)] },
            Series { name: "Heun".into(), points: vec![(19.0, 0.15), (39.0, 0.05)] },
        ];
        let empty: Vec<Series> = vec![Series { name: "DDIM".into(), points: vec![] }];
        let img = convergence_chart(
            "test",
            &[
                Panel {
                    caption: "a",
                    y_label: "RMSE",
                    series: &series,
                    legend: SeriesLabelPosition::UpperRight,
                    from_zero: true,
                },
                Panel {
                    caption: "b",
                    y_label: "PSNR",
                    series: &empty,
                    legend: SeriesLabelPosition::LowerRight,
                    from_zero: false,
                },
            ],
        )
        .unwrap();
        assert_eq!(img.dimensions(), (CHART_WIDTH, CHART_HEIGHT));
        let colored = img.pixels().filter(|p| p.0[0].abs_diff(p.0[1]) > 60 || p.0[1].abs_diff(p.0[2]) > 60).count();
        assert!(colored > 200, "coloured lines drawn: {colored}");
        let dark = img.pixels().filter(|p| p.0.iter().all(|&v| v < 80)).count();
        assert!(dark > 500, "text and axes drawn: {dark}");
    }
}
