//! The bundled font (DejaVu Sans, `assets/fonts/`, compiled into the binary: no system font lookup at run time) and
//! a small text rasteriser for labelling images.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

/// DejaVu Sans (license: `assets/fonts/LICENSE`).
pub static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The family name the font is registered under for plotters.
pub const PLOTTERS_FAMILY: &str = "sans-serif";

pub fn font() -> FontRef<'static> {
    FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses")
}

/// Registers the bundled font with plotters (once per process) as [`PLOTTERS_FAMILY`].
pub fn register_plotters_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(PLOTTERS_FAMILY, plotters::style::FontStyle::Normal, FONT_BYTES).is_err() {
            panic!("the bundled font parses");
        }
    });
}

/// Width in pixels of `text` set at `px` pixels (the font's em size), with kerning.
pub fn text_width(text: &str, px: f32) -> f32 {
    let font = font();
    let scaled = font.as_scaled(PxScale::from(px));
    let mut width = 0.0;
    let mut previous = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = previous {
            width += scaled.kern(p, id);
        }
        width += scaled.h_advance(id);
        previous = Some(id);
    }
    width
}

/// The largest size ≤ `px` (and ≥ 6) at which `text` fits in `max_width` pixels.
pub fn fit_size(text: &str, px: f32, max_width: f32) -> f32 {
    let width = text_width(text, px);
    if width <= max_width || width == 0.0 {
        return px;
    }
    (px * max_width / width).max(6.0)
}

/// Height of a line of text set at `px`: ascent − descent.
pub fn line_height(px: f32) -> f32 {
    let font = font();
    let scaled = font.as_scaled(PxScale::from(px));
    scaled.ascent() - scaled.descent()
}

/// Draws `text` with its line box's top-left corner at (`x`, `top`), blending `color` over the image by glyph
/// coverage; parts outside the image are clipped.
pub fn draw_text(image: &mut RgbImage, text: &str, px: f32, x: f32, top: f32, color: Rgb<u8>) {
    let font = font();
    let scale = PxScale::from(px);
    let scaled = font.as_scaled(scale);
    let baseline = top + scaled.ascent();
    let mut caret = x;
    let mut previous = None;
    let (w, h) = (image.width() as i64, image.height() as i64);
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = previous {
            caret += scaled.kern(p, id);
        }
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(caret, baseline));
        caret += scaled.h_advance(id);
        previous = Some(id);
        let Some(outlined) = font.outline_glyph(glyph) else { continue };
        let bounds = outlined.px_bounds();
        outlined.draw(|gx, gy, coverage| {
            let (px, py) = (bounds.min.x as i64 + gx as i64, bounds.min.y as i64 + gy as i64);
            if px < 0 || py < 0 || px >= w || py >= h {
                return;
            }
            let a = coverage.clamp(0.0, 1.0);
            let pixel = image.get_pixel_mut(px as u32, py as u32);
            for (dst, src) in pixel.0.iter_mut().zip(color.0) {
                *dst = (*dst as f32 * (1.0 - a) + src as f32 * a).round() as u8;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_its_box() {
        let mut img = RgbImage::from_pixel(200, 40, Rgb([255, 255, 255]));
        let px = 20.0;
        let width = text_width("DPM++ 2M Karras", px);
        assert!(width > 100.0 && width < 200.0, "{width}");
        draw_text(&mut img, "DPM++ 2M Karras", px, 4.0, 4.0, Rgb([0, 0, 0]));
        let dark: Vec<(u32, u32)> =
            img.enumerate_pixels().filter(|(_, _, p)| p.0[0] < 128).map(|(x, y, _)| (x, y)).collect();
        assert!(dark.len() > 100, "glyphs were drawn");
        let max_x = dark.iter().map(|p| p.0).max().unwrap();
        let max_y = dark.iter().map(|p| p.1).max().unwrap();
        assert!((max_x as f32) < 4.0 + width + 1.0 && (max_y as f32) < 4.0 + line_height(px) + 1.0);
        assert!(fit_size("DPM++ 2M Karras", px, width / 2.0) < px * 0.51);
        // Clipped at the edges without panicking.
        draw_text(&mut img, "Euler", 30.0, 190.0, 30.0, Rgb([0, 0, 0]));
    }
}
