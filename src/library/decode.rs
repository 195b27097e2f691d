//! Decoding image files into 8-bit RGB: JPEG with libjpeg-turbo (see
//! `jpeg`), every other format the `image` crate reads (PNG, WebP, GIF's
//! first frame, BMP, TIFF, ...) with it; EXIF orientation
//! applied, transparency composited onto white, 16-bit and grey widened or
//! narrowed to 8-bit RGB, and a cap on decoded pixels against decompression
//! bombs.
//!
//! Compositing follows transformers' `convert_to_rgb` (Pillow's
//! `alpha_composite` onto opaque white), integer for integer.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

/// Why a file could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot read file: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty file")]
    Empty,
    #[error("not an image (unrecognised format)")]
    UnknownFormat,
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error("image exceeds the limits of the decoder: {0}")]
    Limits(String),
    #[error("corrupt or truncated {format} image: {message}")]
    Corrupt { format: String, message: String },
    #[error("unsupported image: {0}")]
    Unsupported(String),
}

/// Bounds on what a decode may cost.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Most pixels (width times height) an image may have.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 178 megapixels: Pillow's own decompression-bomb error threshold.
        Self { max_pixels: 2 * 89_478_485 }
    }
}

/// A decoded picture.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    /// Upright 8-bit RGB pixels.
    pub rgb: RgbImage,
    pub format: ImageFormat,
    /// Size as stored in the file, before EXIF orientation.
    pub stored_width: u32,
    pub stored_height: u32,
    /// EXIF orientation (1-8) as read from the file.
    pub orientation: u8,
}

impl DecodedImage {
    /// Full-resolution size once upright (`rgb` may be smaller when the
    /// decoder scaled it down).
    pub fn upright_size(&self) -> (u32, u32) {
        if self.orientation >= 5 { (self.stored_height, self.stored_width) } else { (self.stored_width, self.stored_height) }
    }
}

/// Decodes an image file.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<DecodedImage, DecodeError> {
    let bytes = std::fs::read(path)?;
    decode_bytes(&bytes, limits)
}

/// Decodes an image held in memory.
pub fn decode_bytes(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedImage, DecodeError> {
    decode_bytes_scaled(bytes, limits, None)
}

/// Decodes an image, letting JPEG decode at 1/2, 1/4 or 1/8 size in the DCT
/// as long as the shorter side stays at least `min_side` (a large photo then
/// costs a fraction of a full decode). Other formats decode at full size.
/// `stored_width` and `stored_height` are always the full size.
pub fn decode_bytes_scaled(
    bytes: &[u8],
    limits: &DecodeLimits,
    min_side: Option<u32>,
) -> Result<DecodedImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let format = reader.format().ok_or(DecodeError::UnknownFormat)?;
    if format == ImageFormat::Jpeg {
        let jpeg = super::jpeg::decode(bytes, limits, min_side)?;
        let mut image = DynamicImage::ImageRgb8(jpeg.rgb);
        image.apply_orientation(jpeg.orientation);
        return Ok(DecodedImage {
            rgb: image.into_rgb8(),
            format,
            stored_width: jpeg.stored_width,
            stored_height: jpeg.stored_height,
            orientation: jpeg.orientation.to_exif(),
        });
    }
    let mut image_limits = image::Limits::default();
    // Let the decoder allocate what the pixel cap allows at 16 bits x 4 channels.
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(512 << 20));
    reader.limits(image_limits);
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Unsupported(u) => DecodeError::Unsupported(u.to_string()),
        image::ImageError::Limits(l) => DecodeError::Limits(l.to_string()),
        other => DecodeError::Corrupt { format: format_name(format), message: other.to_string() },
    };
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(DecodeError::TooLarge { width, height, limit: limits.max_pixels });
    }
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt { format: format_name(format), message: "zero-sized image".into() });
    }
    // A broken EXIF block is no reason to lose the picture: keep it as stored.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(DecodedImage {
        rgb: to_rgb(image),
        format,
        stored_width: width,
        stored_height: height,
        orientation: orientation.to_exif(),
    })
}

fn format_name(format: ImageFormat) -> String {
    format.extensions_str().first().map_or_else(|| format!("{format:?}"), |e| e.to_uppercase())
}

/// Converts to 8-bit RGB, compositing transparency onto white.
pub fn to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = composite_on_white(src[c] as u32, a);
        }
    }
    out
}

/// Pillow's `alpha_composite` of (c, a) over opaque white (`AlphaComposite.c`,
/// 7-bit precision), which is where transformers' RGB conversion sends alpha.
#[inline]
fn composite_on_white(c: u32, a: u32) -> u8 {
    const PRECISION_BITS: u32 = 7;
    // With an opaque destination, outa255 = 255 * 255 and the coefficients reduce to:
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 - a) << PRECISION_BITS;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_matches_pillow_at_the_ends() {
        for c in [0, 1, 127, 254, 255] {
            assert_eq!(composite_on_white(c, 255), c as u8);
            assert_eq!(composite_on_white(c, 0), 255);
        }
        // Values Pillow 13's alpha_composite gives over white.
        for (c, a, pillow) in [(0, 128, 127), (10, 37, 219), (200, 99, 234), (33, 1, 254), (77, 254, 78)] {
            assert_eq!(composite_on_white(c, a), pillow, "c={c} a={a}");
        }
    }

    #[test]
    fn rejects_non_images() {
        let limits = DecodeLimits::default();
        assert!(matches!(decode_bytes(b"", &limits), Err(DecodeError::Empty)));
        assert!(matches!(decode_bytes(b"hello, not an image", &limits), Err(DecodeError::UnknownFormat)));
    }

    #[test]
    fn caps_pixels_before_decoding() {
        let image = RgbImage::new(300, 200);
        let mut png = Vec::new();
        image.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let err = decode_bytes(&png, &DecodeLimits { max_pixels: 10_000 }).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 300, height: 200, .. }), "{err}");
        assert!(decode_bytes(&png, &DecodeLimits::default()).is_ok());
    }
}
