//! Thumbnails: 256 px on the longest side, JPEG, content-addressed
//! (`thumbs/ab/<blake3>.jpg`), so moved and duplicate photos share one and
//! the web page never decodes an original to show a result.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::{ContentHash, Resample, RgbView, resample};

/// Longest side of a thumbnail.
pub const THUMB_SIZE: u32 = 256;
const QUALITY: f32 = 82.0;

/// Where the thumbnail of content `hash` lives under `thumbs`.
pub fn thumb_path(thumbs: &Path, hash: &ContentHash) -> PathBuf {
    let hex = hash.to_string();
    thumbs.join(&hex[..2]).join(format!("{hex}.jpg"))
}

/// Encodes a thumbnail of an upright RGB image.
///
/// With libjpeg-turbo's baseline encoder (mozjpeg set to its fastest
/// profile, which writes what libjpeg-turbo writes): image's own encoder took
/// 2.2% of the CPU of indexing the shared photos in int8, this one 1.2%.
pub fn encode_thumbnail(image: RgbView) -> std::io::Result<Vec<u8>> {
    let (w, h) = (image.width, image.height);
    let scale = THUMB_SIZE as f64 / w.max(h) as f64;
    let resized;
    let (data, w, h) = if scale < 1.0 {
        let (tw, th) = (
            ((w as f64 * scale).round() as usize).max(1),
            ((h as f64 * scale).round() as usize).max(1),
        );
        resized = resample(image, tw, th, Resample::Bicubic);
        (resized.as_slice(), tw, th)
    } else {
        (image.data, w, h)
    };
    // libjpeg reports errors by unwinding (mozjpeg's error manager): an
    // error here, never a crash.
    std::panic::catch_unwind(|| {
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        compress.set_fastest_defaults();
        compress.set_size(w, h);
        compress.set_quality(QUALITY);
        compress.set_optimize_coding(true);
        let mut started = compress.start_compress(Vec::new())?;
        started.write_scanlines(&data[..w * h * 3])?;
        started.finish()
    })
    .unwrap_or_else(|_| Err(std::io::Error::other("the JPEG encoder failed")))
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
    use image::RgbImage;

    #[test]
    fn thumbnails_fit_the_box() {
        let image = RgbImage::from_pixel(1000, 400, image::Rgb([10, 200, 30]));
        fn view(i: &RgbImage) -> RgbView<'_> {
            RgbView::new(i.width() as usize, i.height() as usize, i.as_raw()).unwrap()
        }
        let jpeg = encode_thumbnail(view(&image)).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (256, 102));
        // The colours survive the encoder (JPEG's rounding aside).
        for p in back.to_rgb8().pixels() {
            let d =
                p.0.iter()
                    .zip([10, 200, 30])
                    .map(|(&a, b)| (a as i32 - b).abs());
            assert!(d.max().unwrap_or(0) <= 3, "{:?}", p.0);
        }
        // A picture of two halves stays two halves.
        let halves = RgbImage::from_fn(300, 300, |x, _| match x < 150 {
            true => image::Rgb([250, 250, 250]),
            false => image::Rgb([0, 0, 200]),
        });
        let back = image::load_from_memory(&encode_thumbnail(view(&halves)).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(back.dimensions(), (256, 256));
        assert!(back.get_pixel(20, 128).0.iter().all(|&v| v > 240));
        let right = back.get_pixel(236, 128).0;
        assert!(
            right[0] < 10 && right[1] < 10 && right[2] > 190,
            "{right:?}"
        );
        let small = RgbImage::new(100, 50);
        let back = image::load_from_memory(&encode_thumbnail(view(&small)).unwrap()).unwrap();
        assert_eq!((back.width(), back.height()), (100, 50));
    }
}
