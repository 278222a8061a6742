// SPDX-License-Identifier: MIT OR Apache-2.0
//! A small RGB raster for the evaluation plots: filled rectangles, lines, images and
//! text in a built-in 5x7 bitmap font (digits, capital letters and some punctuation;
//! lower-case letters are drawn as capitals).

use std::path::Path;

use anyhow::{Context, Result};

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [160, 160, 160];
pub const LIGHT_GREY: Rgb = [225, 225, 225];

/// Width and height of a glyph cell in font pixels, including one column of spacing.
const GLYPH_WIDTH: usize = 6;
const GLYPH_HEIGHT: usize = 7;

/// 5x7 glyphs, one byte per row from the top, bit 4 the leftmost column.
const GLYPHS: &[(char, [u8; 7])] = &[
    (' ', [0, 0, 0, 0, 0, 0, 0]),
    ('0', [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e]),
    ('1', [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e]),
    ('2', [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f]),
    ('3', [0x1e, 0x01, 0x01, 0x0e, 0x01, 0x01, 0x1e]),
    ('4', [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02]),
    ('5', [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e]),
    ('6', [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e]),
    ('7', [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e]),
    ('9', [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c]),
    ('A', [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11]),
    ('B', [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e]),
    ('C', [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e]),
    ('D', [0x1e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1e]),
    ('E', [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f]),
    ('F', [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10]),
    ('G', [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f]),
    ('H', [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11]),
    ('I', [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e]),
    ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c]),
    ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
    ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f]),
    ('M', [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11]),
    ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    ('O', [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e]),
    ('P', [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10]),
    ('Q', [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d]),
    ('R', [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11]),
    ('S', [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e]),
    ('T', [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e]),
    ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04]),
    ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a]),
    ('X', [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11]),
    ('Y', [0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04]),
    ('Z', [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f]),
    ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c]),
    (',', [0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08]),
    ('-', [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00]),
    ('+', [0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00]),
    (':', [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00]),
    ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
    (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
    ('/', [0x01, 0x02, 0x02, 0x04, 0x08, 0x08, 0x10]),
    ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f]),
    ('=', [0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00]),
    ('%', [0x19, 0x1a, 0x02, 0x04, 0x08, 0x0b, 0x13]),
    ('<', [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02]),
    ('>', [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08]),
    ('?', [0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04]),
];

fn glyph(c: char) -> [u8; 7] {
    let upper = c.to_ascii_uppercase();
    GLYPHS
        .iter()
        .find(|(g, _)| *g == upper)
        .or_else(|| GLYPHS.iter().find(|(g, _)| *g == '?'))
        .map(|(_, rows)| *rows)
        .expect("the font has a '?' glyph")
}

/// An 8-bit RGB image being drawn on. Coordinates are pixels from the top-left
/// corner; anything drawn outside the image is clipped.
#[derive(Debug, Clone)]
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// Creates a canvas filled with `background`.
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        let mut pixels = Vec::with_capacity(3 * width * height);
        for _ in 0..width * height {
            pixels.extend_from_slice(&background);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Colour of one pixel.
    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = 3 * (y * self.width + x);
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Sets one pixel, ignoring coordinates outside the canvas.
    pub fn put(&mut self, x: i64, y: i64, colour: Rgb) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let i = 3 * (y as usize * self.width + x as usize);
        self.pixels[i..i + 3].copy_from_slice(&colour);
    }

    /// Fills the rectangle with corners `(x0, y0)` (included) and `(x1, y1)` (excluded).
    pub fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, colour: Rgb) {
        for y in y0.max(0)..y1.min(self.height as i64) {
            for x in x0.max(0)..x1.min(self.width as i64) {
                self.put(x, y, colour);
            }
        }
    }

    /// Draws the outline of a rectangle, `thickness` pixels wide, inside its bounds.
    pub fn stroke_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, thickness: i64, colour: Rgb) {
        self.fill_rect(x0, y0, x1, y0 + thickness, colour);
        self.fill_rect(x0, y1 - thickness, x1, y1, colour);
        self.fill_rect(x0, y0, x0 + thickness, y1, colour);
        self.fill_rect(x1 - thickness, y0, x1, y1, colour);
    }

    /// Draws a line `thickness` pixels wide between two points. With `dash = Some(n)`
    /// the line is drawn in dashes of `n` pixels with gaps of `n` pixels.
    pub fn line(
        &mut self,
        (x0, y0): (f64, f64),
        (x1, y1): (f64, f64),
        thickness: i64,
        colour: Rgb,
        dash: Option<usize>,
    ) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        let offset = -(thickness - 1) / 2;
        for i in 0..=steps {
            if dash.is_some_and(|n| (i / n.max(1)) % 2 == 1) {
                continue;
            }
            let t = i as f64 / steps as f64;
            let x = (x0 + (x1 - x0) * t).round() as i64 + offset;
            let y = (y0 + (y1 - y0) * t).round() as i64 + offset;
            self.fill_rect(x, y, x + thickness, y + thickness, colour);
        }
    }

    /// Draws a polyline through `points`.
    pub fn polyline(&mut self, points: &[(f64, f64)], thickness: i64, colour: Rgb) {
        for pair in points.windows(2) {
            self.line(pair[0], pair[1], thickness, colour, None);
        }
    }

    /// Copies a packed RGB image of `width` x `height` with its top-left at `(x, y)`.
    pub fn blit(&mut self, x: i64, y: i64, rgb: &[u8], width: usize, height: usize) {
        assert_eq!(
            rgb.len(),
            3 * width * height,
            "RGB data of {width}x{height}"
        );
        for (row, line) in rgb.chunks_exact(3 * width).enumerate() {
            for (col, px) in line.chunks_exact(3).enumerate() {
                self.put(x + col as i64, y + row as i64, [px[0], px[1], px[2]]);
            }
        }
    }

    /// Width in pixels of `text` drawn at `scale`.
    pub fn text_width(text: &str, scale: usize) -> usize {
        (text.chars().count() * GLYPH_WIDTH).saturating_sub(1) * scale
    }

    /// Height in pixels of a line of text at `scale`.
    pub fn text_height(scale: usize) -> usize {
        GLYPH_HEIGHT * scale
    }

    /// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale`
    /// pixels square.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, colour: Rgb) {
        let s = scale as i64;
        for (i, c) in text.chars().enumerate() {
            let left = x + (i * GLYPH_WIDTH * scale) as i64;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let px = left + col * s;
                        let py = y + row as i64 * s;
                        self.fill_rect(px, py, px + s, py + s, colour);
                    }
                }
            }
        }
    }

    /// Writes the canvas as an 8-bit RGB PNG.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        image::save_buffer(
            path,
            &self.pixels,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("cannot write plot {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_are_unique_and_fit() {
        for (i, (c, rows)) in GLYPHS.iter().enumerate() {
            assert!(rows.iter().all(|r| *r < 0x20), "{c} is wider than 5");
            assert!(
                GLYPHS[i + 1..].iter().all(|(other, _)| other != c),
                "{c} is defined twice"
            );
        }
    }

    #[test]
    fn text_draws_inside_its_box() {
        let mut canvas = Canvas::new(40, 20, WHITE);
        canvas.text(2, 3, "A1", 2, BLACK);
        let width = Canvas::text_width("A1", 2);
        assert_eq!(width, 22);
        let mut inked = 0;
        for y in 0..20 {
            for x in 0..40 {
                if canvas.pixel(x, y) == BLACK {
                    inked += 1;
                    assert!((2..2 + width).contains(&x), "ink at x {x}");
                    assert!((3..3 + Canvas::text_height(2)).contains(&y), "ink at y {y}");
                }
            }
        }
        assert!(inked > 0);
    }

    #[test]
    fn unknown_characters_draw_as_question_mark() {
        assert_eq!(glyph('\u{e9}'), glyph('?'));
        assert_eq!(glyph('a'), glyph('A'));
    }

    #[test]
    fn drawing_outside_is_clipped() {
        let mut canvas = Canvas::new(4, 4, WHITE);
        canvas.fill_rect(-10, -10, 2, 2, BLACK);
        canvas.line((-5.0, 3.0), (10.0, 3.0), 1, GREY, None);
        assert_eq!(canvas.pixel(0, 0), BLACK);
        assert_eq!(canvas.pixel(2, 2), WHITE);
        assert_eq!(canvas.pixel(3, 3), GREY);
    }
}
