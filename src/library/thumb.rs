//! Thumbnails: 256 px on the longest side, JPEG, content-addressed
//! (`thumbs/ab/<blake3>.jpg`), so moved and duplicate photos share one and
//! the web page never decodes an original to show a result.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;

use crate::common::{ContentHash, Resample, RgbView, resample};

/// Longest side of a thumbnail.
pub const THUMB_SIZE: u32 = 256;
const QUALITY: u8 = 82;

/// Where the thumbnail of content `hash` lives under `thumbs`.
pub fn thumb_path(thumbs: &Path, hash: &ContentHash) -> PathBuf {
    let hex = hash.to_string();
    thumbs.join(&hex[..2]).join(format!("{hex}.jpg"))
}

/// Encodes a thumbnail of an upright RGB image.
pub fn encode_thumbnail(image: RgbView) -> Result<Vec<u8>, image::ImageError> {
    let (w, h) = (image.width as u32, image.height as u32);
    let scale = THUMB_SIZE as f64 / w.max(h) as f64;
    let small = if scale < 1.0 {
        let (tw, th) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        RgbImage::from_raw(
            tw,
            th,
            resample(image, tw as usize, th as usize, Resample::Bicubic),
        )
    } else {
        RgbImage::from_raw(w, h, image.data.to_vec())
    };
    let small = small.expect("w*h*3 bytes");
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, QUALITY).encode_image(&small)?;
    Ok(out)
}

/// Writes a thumbnail atomically (temporary file, rename); an existing one is kept.
pub fn write_thumbnail(thumbs: &Path, hash: &ContentHash, jpeg: &[u8]) -> std::io::Result<PathBuf> {
    let path = thumb_path(thumbs, hash);
    if path.exists() {
        return Ok(path);
    }
    let dir = path.parent().expect("thumb path has a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{hash}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(jpeg)?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_fit_the_box() {
        let image = RgbImage::from_pixel(1000, 400, image::Rgb([10, 200, 30]));
        fn view(i: &RgbImage) -> RgbView<'_> {
            RgbView::new(i.width() as usize, i.height() as usize, i.as_raw()).unwrap()
        }
        let jpeg = encode_thumbnail(view(&image)).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (256, 102));
        let small = RgbImage::new(100, 50);
        let back = image::load_from_memory(&encode_thumbnail(view(&small)).unwrap()).unwrap();
        assert_eq!((back.width(), back.height()), (100, 50));
    }
}
