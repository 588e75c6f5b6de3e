//! The labelled contact sheet: one row per scheduler, one column per step count, scheduler names at the row starts,
//! step counts on top and a caption (NFE and distances) under each image.
//!
//! Layout, in pixels (see [`GridLayout`]): every image is resized so that its longer side is [`THUMB`] (aspect kept);
//! a label column of [`LABEL_WIDTH`] on the left and a header row of [`HEADER_HEIGHT`] on top; each cell is the
//! image, a caption strip of [`CAPTION_HEIGHT`] under it and a [`GAP`] after it on the right and below. So the sheet
//! is `LABEL_WIDTH + cols · (cell_w + GAP)` wide and `HEADER_HEIGHT + rows · (cell_h + CAPTION_HEIGHT + GAP)` high.

use image::imageops::FilterType;
use image::{Rgb, RgbImage};

use super::text;

/// Longer side of each image in the sheet.
pub const THUMB: u32 = 256;
pub const LABEL_WIDTH: u32 = 200;
pub const HEADER_HEIGHT: u32 = 32;
pub const CAPTION_HEIGHT: u32 = 20;
pub const GAP: u32 = 4;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const MUTED: Rgb<u8> = Rgb([90, 90, 90]);

/// Where everything goes on a sheet of `rows × cols` images of one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub rows: u32,
    pub cols: u32,
    pub cell_width: u32,
    pub cell_height: u32,
}

impl GridLayout {
    pub fn new(rows: usize, cols: usize, image_width: u32, image_height: u32) -> Self {
        let longer = image_width.max(image_height).max(1) as f64;
        let scale = |v: u32| ((v as f64 * THUMB as f64 / longer).round() as u32).max(1);
        Self { rows: rows as u32, cols: cols as u32, cell_width: scale(image_width), cell_height: scale(image_height) }
    }

    /// (width, height) of the whole sheet.
    pub fn size(&self) -> (u32, u32) {
        (
            LABEL_WIDTH + self.cols * (self.cell_width + GAP),
            HEADER_HEIGHT + self.rows * (self.cell_height + CAPTION_HEIGHT + GAP),
        )
    }

    /// Top-left corner of the image in row `row`, column `col`.
    pub fn cell_origin(&self, row: usize, col: usize) -> (u32, u32) {
        (
            LABEL_WIDTH + col as u32 * (self.cell_width + GAP),
            HEADER_HEIGHT + row as u32 * (self.cell_height + CAPTION_HEIGHT + GAP),
        )
    }
}

/// One image of the sheet and the caption under it.
pub struct Cell<'a> {
    pub image: &'a RgbImage,
    pub caption: String,
}

/// Draws the sheet. `cells[row][col]`; a missing cell (`None`) is left blank. All images must share one size.
pub fn contact_sheet(row_labels: &[String], col_labels: &[String], cells: &[Vec<Option<Cell>>]) -> RgbImage {
    let (iw, ih) = cells.iter().flatten().flatten().next().map_or((THUMB, THUMB), |c| c.image.dimensions());
    let layout = GridLayout::new(row_labels.len(), col_labels.len(), iw, ih);
    let (width, height) = layout.size();
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    let (cw, ch) = (layout.cell_width, layout.cell_height);

    let header_px = 18.0;
    for (col, label) in col_labels.iter().enumerate() {
        let px = text::fit_size(label, header_px, cw as f32 - 4.0);
        let (x, _) = layout.cell_origin(0, col);
        let left = x as f32 + (cw as f32 - text::text_width(label, px)) / 2.0;
        let top = (HEADER_HEIGHT as f32 - text::line_height(px)) / 2.0;
        text::draw_text(&mut sheet, label, px, left, top, INK);
    }
    for (row, label) in row_labels.iter().enumerate() {
        let px = text::fit_size(label, 18.0, LABEL_WIDTH as f32 - 16.0);
        let (_, y) = layout.cell_origin(row, 0);
        let top = y as f32 + (ch as f32 - text::line_height(px)) / 2.0;
        text::draw_text(&mut sheet, label, px, 8.0, top, INK);
    }
    for (row, cells) in cells.iter().enumerate().take(row_labels.len()) {
        for (col, cell) in cells.iter().enumerate().take(col_labels.len()) {
            let Some(cell) = cell else { continue };
            let (x, y) = layout.cell_origin(row, col);
            let filter = if cw < cell.image.width() { FilterType::Lanczos3 } else { FilterType::Nearest };
            let thumb = if (cw, ch) == cell.image.dimensions() {
                cell.image.clone()
            } else {
                image::imageops::resize(cell.image, cw, ch, filter)
            };
            image::imageops::replace(&mut sheet, &thumb, x as i64, y as i64);
            let px = text::fit_size(&cell.caption, 13.0, cw as f32 - 4.0);
            let left = x as f32 + (cw as f32 - text::text_width(&cell.caption, px)) / 2.0;
            let top = (y + ch) as f32 + (CAPTION_HEIGHT as f32 - text::line_height(px)) / 2.0;
            text::draw_text(&mut sheet, &cell.caption, px, left, top, MUTED);
        }
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_by_hand() {
        // 64×64 images are shown at 256×256: 200 + 2·(256 + 4) = 720 wide, 32 + 3·(256 + 20 + 4) = 872 high.
        let l = GridLayout::new(3, 2, 64, 64);
        assert_eq!((l.cell_width, l.cell_height), (256, 256));
        assert_eq!(l.size(), (720, 872));
        assert_eq!(l.cell_origin(1, 1), (460, 312));
        // 1024×768 images: 256×192 cells.
        let l = GridLayout::new(1, 4, 1024, 768);
        assert_eq!((l.cell_width, l.cell_height), (256, 192));
        assert_eq!(l.size(), (200 + 4 * 260, 32 + 216));
    }

    #[test]
    fn sheet_places_images_and_labels() {
        let red = RgbImage::from_pixel(64, 32, Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(64, 32, Rgb([0, 0, 255]));
        let rows = vec!["Euler".to_string(), "DPM++ 2M SDE Karras (a very long name)".to_string()];
        let cols = vec!["10 steps".to_string(), "20 steps".to_string()];
        let cell = |image| Some(Cell { image, caption: "NFE 10 · PSNR 20.0 dB".into() });
        let cells = vec![vec![cell(&red), cell(&blue)], vec![cell(&blue), None]];
        let sheet = contact_sheet(&rows, &cols, &cells);
        let layout = GridLayout::new(2, 2, 64, 32);
        assert_eq!(sheet.dimensions(), layout.size());
        let (x, y) = layout.cell_origin(0, 1);
        assert_eq!(*sheet.get_pixel(x + 10, y + 10), Rgb([0, 0, 255]));
        let (x, y) = layout.cell_origin(1, 1);
        assert_eq!(*sheet.get_pixel(x + 10, y + 10), BACKGROUND, "missing cell stays blank");
        // Something is written in the label column and the header row.
        let inked = |x0: u32, y0: u32, x1: u32, y1: u32| {
            (x0..x1).flat_map(|x| (y0..y1).map(move |y| (x, y))).any(|(x, y)| sheet.get_pixel(x, y).0[0] < 100)
        };
        let (_, row1) = layout.cell_origin(1, 0);
        assert!(inked(0, row1, LABEL_WIDTH, row1 + layout.cell_height), "row label");
        assert!(inked(LABEL_WIDTH, 0, sheet.width(), HEADER_HEIGHT), "column label");
    }
}
