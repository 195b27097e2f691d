//! JPEG decoding with libjpeg-turbo's decoder (through mozjpeg, which ships
//! its source and builds it with the C compiler alone).
//!
//! This is the decoder Pillow uses, so a photo decodes here to the pixels the
//! reference implementation sees (same integer IDCT, same "fancy" chroma
//! upsampling); the pure-Rust decoder of the `image` crate differs by up to 3
//! levels. It can also decode at 1/2, 1/4 or 1/8 size in the DCT, which the
//! indexer uses on large photos.

use image::RgbImage;
use image::metadata::Orientation;

use super::decode::{DecodeError, DecodeLimits};

/// What the marker segments before the image data say.
#[derive(Debug, Default)]
struct Markers<'a> {
    /// An APP14 "Adobe" segment: CMYK is stored inverted.
    adobe: bool,
    /// The TIFF payload of an APP1 "Exif" segment.
    exif: Option<&'a [u8]>,
    /// Offset of the first start-of-scan segment.
    scan_start: Option<usize>,
}

/// Walks the segments from SOI to the first SOS.
fn scan_markers(bytes: &[u8]) -> Markers<'_> {
    let mut m = Markers::default();
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            break;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if (0xD0..=0xD8).contains(&marker) || marker == 0x01 {
            i += 2; // markers without a length
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let body = bytes
            .get(i + 4..(i + 2 + len).min(bytes.len()))
            .unwrap_or(&[]);
        match marker {
            0xDA => {
                m.scan_start = Some(i);
                break;
            }
            0xE1 if body.starts_with(b"Exif\0\0") && m.exif.is_none() => m.exif = Some(&body[6..]),
            0xEE if body.starts_with(b"Adobe") => m.adobe = true,
            _ => {}
        }
        i += 2 + len;
    }
    m
}

/// Whether an end-of-image marker follows the first scan. Entropy-coded data
/// stuffs every 0xFF with 0x00, so 0xFF 0xD9 there can only be EOI: a file
/// without it was cut short (Pillow refuses such files too).
fn has_end_marker(bytes: &[u8], scan_start: usize) -> bool {
    bytes[scan_start..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// A decoded JPEG: upright-to-be pixels and the EXIF orientation to apply.
pub struct Jpeg {
    pub rgb: RgbImage,
    pub orientation: Orientation,
    pub stored_width: u32,
    pub stored_height: u32,
}

/// Pillow's CMYK to RGB: `(255 - c) * (255 - k) / 255`, rounded as its MULDIV255.
#[inline]
fn cmyk_to_rgb(c: u8, k: u8) -> u8 {
    let nk = 255 - k as u32;
    let tmp = c as u32 * nk + 128;
    let muldiv = ((tmp >> 8) + tmp) >> 8;
    (nk - muldiv) as u8
}

/// The DCT scale `n` (the image decodes at `n/8` of its size) that keeps the
/// shorter side at least `target`: scaled sizes are `ceil(size * n / 8)`.
pub(crate) fn scale_numerator(short: u64, target: u32) -> u64 {
    (1..=8u64)
        .find(|&n| (short * n).div_ceil(8) >= target as u64)
        .unwrap_or(8)
}

/// Decodes a JPEG. `scale_to` asks for DCT-domain downscaling: the result is
/// the smallest of 1/8 .. 8/8 whose shorter side is still at least `scale_to`.
pub fn decode(
    bytes: &[u8],
    limits: &DecodeLimits,
    scale_to: Option<u32>,
) -> Result<Jpeg, DecodeError> {
    let corrupt = |message: String| DecodeError::Corrupt {
        format: "JPEG".into(),
        message,
    };
    let markers = scan_markers(bytes);
    let scan_start = markers
        .scan_start
        .ok_or_else(|| corrupt("no image data (missing start of scan)".into()))?;
    if !has_end_marker(bytes, scan_start) {
        return Err(corrupt("file ends early (no end-of-image marker)".into()));
    }
    let orientation = markers
        .exif
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);

    // libjpeg reports fatal errors by unwinding (mozjpeg's error manager);
    // catch them here so a bad file is an error, never a crash.
    let result = std::panic::catch_unwind(|| -> Result<Jpeg, DecodeError> {
        let mut decompress =
            mozjpeg::Decompress::new_mem(bytes).map_err(|e| corrupt(e.to_string()))?;
        let (width, height) = decompress.size();
        let (stored_width, stored_height) = (width as u32, height as u32);
        limits.check(stored_width, stored_height)?;
        if width == 0 || height == 0 {
            return Err(corrupt("zero-sized image".into()));
        }
        if let Some(target) = scale_to {
            decompress.scale(scale_numerator(width.min(height) as u64, target) as u8);
        }
        let (rgb, w, h) = match decompress.image().map_err(|e| corrupt(e.to_string()))? {
            mozjpeg::decompress::Format::RGB(mut d) => {
                let (w, h) = (d.width(), d.height());
                let data = d
                    .read_scanlines::<[u8; 3]>()
                    .map_err(|e| corrupt(e.to_string()))?;
                d.finish().map_err(|e| corrupt(e.to_string()))?;
                (data.into_iter().flatten().collect::<Vec<u8>>(), w, h)
            }
            mozjpeg::decompress::Format::Gray(mut d) => {
                let (w, h) = (d.width(), d.height());
                let data = d
                    .read_scanlines::<u8>()
                    .map_err(|e| corrupt(e.to_string()))?;
                d.finish().map_err(|e| corrupt(e.to_string()))?;
                (data.into_iter().flat_map(|g| [g, g, g]).collect(), w, h)
            }
            mozjpeg::decompress::Format::CMYK(mut d) => {
                let (w, h) = (d.width(), d.height());
                let data = d
                    .read_scanlines::<[u8; 4]>()
                    .map_err(|e| corrupt(e.to_string()))?;
                d.finish().map_err(|e| corrupt(e.to_string()))?;
                let invert = markers.adobe;
                let rgb = data
                    .into_iter()
                    .flat_map(|p| {
                        let p = if invert { p.map(|v| 255 - v) } else { p };
                        [
                            cmyk_to_rgb(p[0], p[3]),
                            cmyk_to_rgb(p[1], p[3]),
                            cmyk_to_rgb(p[2], p[3]),
                        ]
                    })
                    .collect();
                (rgb, w, h)
            }
        };
        let rgb = RgbImage::from_raw(w as u32, h as u32, rgb)
            .ok_or_else(|| corrupt("short pixel buffer".into()))?;
        Ok(Jpeg {
            rgb,
            orientation,
            stored_width,
            stored_height,
        })
    });
    match result {
        Ok(r) => r,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "decoder failed".into());
            Err(corrupt(
                message
                    .trim_start_matches("libjpeg fatal error: ")
                    .to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_is_pillows() {
        assert_eq!(cmyk_to_rgb(0, 0), 255);
        assert_eq!(cmyk_to_rgb(255, 0), 0);
        assert_eq!(cmyk_to_rgb(0, 255), 0);
        // Values Pillow 13 gives for CMYK (128, _, _, 128), (10, _, _, 3), (200, _, _, 3).
        assert_eq!(cmyk_to_rgb(128, 128), 63);
        assert_eq!(cmyk_to_rgb(10, 3), 242);
        assert_eq!(cmyk_to_rgb(200, 3), 54);
    }

    #[test]
    fn finds_markers_and_end() {
        // SOI, APP14 Adobe, SOS with stuffed data, EOI.
        let mut jpeg = vec![
            0xFF, 0xD8, 0xFF, 0xEE, 0x00, 0x07, b'A', b'd', b'o', b'b', b'e',
        ];
        let sos = jpeg.len();
        jpeg.extend([0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34]);
        let m = scan_markers(&jpeg);
        assert!(m.adobe);
        assert_eq!(m.scan_start, Some(sos));
        assert!(!has_end_marker(&jpeg, sos));
        jpeg.extend([0xFF, 0xD9]);
        assert!(has_end_marker(&jpeg, sos));
    }
}
