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

use crate::common::{ContentHash, RgbView};
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
    #[error(
        "image of {width}x{height} pixels is too narrow for its length (aspect ratio over {limit}:1)"
    )]
    AspectRatio { width: u32, height: u32, limit: u32 },
    #[error("file of {size} bytes exceeds the limit of {limit} bytes")]
    FileTooLarge { size: u64, limit: u64 },
    #[error("not a regular file ({0})")]
    NotAFile(&'static str),
    #[error("image exceeds the limits of the decoder: {0}")]
    Limits(String),
    #[error("corrupt or truncated {format} image: {message}")]
    Corrupt { format: String, message: String },
    #[error("unsupported image: {0}")]
    Unsupported(String),
}

/// Bounds on what a decode may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most pixels (width times height) an image may have.
    pub max_pixels: u64,
    /// Longest side over shortest side. Resizing the shortest side to the
    /// model's input scales the longest one by the same factor, so a 1 x
    /// 300,000 strip (a few KB of PNG) would otherwise cost gigabytes.
    pub max_aspect_ratio: u32,
    /// Largest file read, bytes; larger files are refused before any read.
    pub max_file_bytes: u64,
}

/// Most bytes of a caption sidecar read (captions keep 2,000 characters).
pub const MAX_SIDECAR_BYTES: u64 = 64 * 1024;

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            // 178 megapixels: Pillow's own decompression-bomb error threshold.
            max_pixels: 2 * 89_478_485,
            // Panoramas and long screenshots stay far below this.
            max_aspect_ratio: 100,
            // Room for a 178-megapixel 16-bit TIFF; no photo file is larger.
            max_file_bytes: 1 << 30,
        }
    }
}

impl DecodeLimits {
    /// Checks a picture's stored size against the limits, before any pixel is decoded.
    pub fn check(&self, width: u32, height: u32) -> Result<(), DecodeError> {
        if width as u64 * height as u64 > self.max_pixels {
            return Err(DecodeError::TooLarge {
                width,
                height,
                limit: self.max_pixels,
            });
        }
        let (long, short) = (width.max(height) as u64, width.min(height) as u64);
        if short > 0 && long > short * self.max_aspect_ratio as u64 {
            return Err(DecodeError::AspectRatio {
                width,
                height,
                limit: self.max_aspect_ratio,
            });
        }
        Ok(())
    }
}

/// What decoding a picture will take, read from its header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes the decode will hold at its peak, counted generously: the
    /// decoder's buffer and the 8-bit RGB copy (JPEGs at their DCT-scaled size).
    pub cost_bytes: u64,
}

/// Reads a picture's header: format, size and decode cost, with the limits
/// checked. Decodes no pixels.
pub fn probe(
    bytes: &[u8],
    limits: &DecodeLimits,
    min_side: Option<u32>,
) -> Result<Probe, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let format = reader.format().ok_or(DecodeError::UnknownFormat)?;
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Unsupported(u) => DecodeError::Unsupported(u.to_string()),
        image::ImageError::Limits(l) => DecodeError::Limits(l.to_string()),
        other => DecodeError::Corrupt {
            format: format_name(format),
            message: other.to_string(),
        },
    };
    let header = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        reader
            .into_decoder()
            .map(|d| (d.dimensions(), d.color_type().bytes_per_pixel() as u64))
    }));
    let ((width, height), bytes_per_pixel) = header
        .unwrap_or_else(|_| {
            Err(image::ImageError::Decoding(
                image::error::DecodingError::from_format_hint(format.into()),
            ))
        })
        .map_err(corrupt)?;
    limits.check(width, height)?;
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt {
            format: format_name(format),
            message: "zero-sized image".into(),
        });
    }
    let (mut w, mut h) = (width as u64, height as u64);
    if let (ImageFormat::Jpeg, Some(target)) = (format, min_side) {
        let n = super::jpeg::scale_numerator(width.min(height) as u64, target);
        (w, h) = ((w * n).div_ceil(8), (h * n).div_ceil(8));
    }
    let cost_bytes = w * h * (bytes_per_pixel + 3);
    Ok(Probe {
        format,
        width,
        height,
        cost_bytes,
    })
}

/// A shared allowance of decode memory: callers that decode concurrently
/// (the server's uploads) take their probe's cost from it first, so many
/// large pictures at once wait or are refused instead of exhausting memory.
#[derive(Debug)]
pub struct DecodeBudget {
    total: u64,
    used: std::sync::Mutex<u64>,
}

/// A share of a [`DecodeBudget`], given back when dropped.
#[derive(Debug)]
pub struct BudgetPermit<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

/// Why a share of the budget was not given.
#[derive(Debug, PartialEq, Eq)]
pub enum BudgetError {
    /// More than the whole budget: never possible.
    Exceeds { needed: u64, total: u64 },
    /// Not now: other decodes hold the budget.
    Busy,
}

impl DecodeBudget {
    pub fn new(total: u64) -> Self {
        Self {
            total,
            used: std::sync::Mutex::new(0),
        }
    }

    /// Bytes currently held by permits.
    pub fn in_use(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `bytes` from the budget without waiting.
    pub fn try_acquire(&self, bytes: u64) -> Result<BudgetPermit<'_>, BudgetError> {
        if bytes > self.total {
            return Err(BudgetError::Exceeds {
                needed: bytes,
                total: self.total,
            });
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if *used + bytes > self.total {
            return Err(BudgetError::Busy);
        }
        *used += bytes;
        Ok(BudgetPermit {
            budget: self,
            bytes,
        })
    }
}

impl Drop for BudgetPermit<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(self.bytes);
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
    /// The pixels as the model's preprocessing reads them.
    pub fn view(&self) -> RgbView<'_> {
        RgbView::new(
            self.rgb.width() as usize,
            self.rgb.height() as usize,
            self.rgb.as_raw(),
        )
        .expect("an RgbImage holds width x height x 3 bytes")
    }

    /// Full-resolution size once upright (`rgb` may be smaller when the
    /// decoder scaled it down).
    pub fn upright_size(&self) -> (u32, u32) {
        if self.orientation >= 5 {
            (self.stored_height, self.stored_width)
        } else {
            (self.stored_width, self.stored_height)
        }
    }
}

/// Decodes an image file.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<DecodedImage, DecodeError> {
    let bytes = read_file(path, limits.max_file_bytes)?;
    decode_bytes(&bytes, limits)
}

/// Opens a regular file for reading, without blocking on a FIFO or a device
/// swapped in where a photo was: the kind is checked on the open handle.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), DecodeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(DecodeError::NotAFile(kind_name(meta.file_type())));
    }
    Ok((file, meta))
}

/// What a directory entry that is not a regular file is, in words.
pub fn kind_name(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match kind {
        k if k.is_dir() => "a folder",
        k if k.is_fifo() => "a FIFO",
        k if k.is_socket() => "a socket",
        k if k.is_symlink() => "a symbolic link",
        _ => "a device",
    }
}

/// Reads a whole regular file of at most `limit` bytes; a larger one is
/// refused before its contents are read (and a file growing meanwhile is cut
/// at the limit and refused too).
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, DecodeError> {
    let (file, meta) = open_regular(path)?;
    read_whole(file, &meta, limit)
}

/// Reads an open regular file whole, refusing one over `limit` bytes.
fn read_whole(
    file: std::fs::File,
    meta: &std::fs::Metadata,
    limit: u64,
) -> Result<Vec<u8>, DecodeError> {
    use std::io::Read;
    if meta.len() > limit {
        return Err(DecodeError::FileTooLarge {
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(DecodeError::FileTooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Files larger than this are hashed as a stream, not held whole, unless
/// they must be decoded.
pub const STREAM_ABOVE: u64 = 64 << 20;
/// How much of a streamed file is kept for its metadata (EXIF and XMP sit
/// at the start of a JPEG, and near it in PNG, WebP and TIFF files).
pub const META_HEAD: u64 = 16 << 20;

/// A file as the indexer first reads it: content hash, size, and the bytes
/// it keeps.
#[derive(Debug)]
pub struct FileRead {
    pub hash: ContentHash,
    pub size: u64,
    /// The whole file when it is at most [`STREAM_ABOVE`] bytes; otherwise
    /// its first [`META_HEAD`] bytes only.
    pub bytes: Vec<u8>,
    pub whole: bool,
}

/// Reads and hashes a regular file of at most `limit` bytes in one pass;
/// a large one streams through the hasher, so a file whose content the
/// index already has costs constant memory.
pub fn read_and_hash(path: &Path, limit: u64) -> Result<FileRead, DecodeError> {
    use std::io::Read;
    let (file, meta) = open_regular(path)?;
    if meta.len() > limit {
        return Err(DecodeError::FileTooLarge {
            size: meta.len(),
            limit,
        });
    }
    if meta.len() <= STREAM_ABOVE {
        let bytes = read_whole(file, &meta, limit)?;
        return Ok(FileRead {
            hash: ContentHash::of(&bytes),
            size: bytes.len() as u64,
            whole: true,
            bytes,
        });
    }
    let mut file = file.take(limit + 1);
    let mut head = Vec::with_capacity(META_HEAD as usize);
    (&mut file).take(META_HEAD).read_to_end(&mut head)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&head);
    hasher.update_reader(&mut file)?;
    let size = hasher.count();
    if size > limit {
        return Err(DecodeError::FileTooLarge { size, limit });
    }
    Ok(FileRead {
        hash: hasher.finalize().into(),
        size,
        bytes: head,
        whole: false,
    })
}

/// Reads at most the first `limit` bytes of a regular file.
pub fn read_prefix(path: &Path, limit: u64) -> Result<Vec<u8>, DecodeError> {
    use std::io::Read;
    let (file, meta) = open_regular(path)?;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
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
        other => DecodeError::Corrupt {
            format: format_name(format),
            message: other.to_string(),
        },
    };
    // The format decoders are other people's parsers of untrusted bytes: a
    // panic in one (a bug met on a hostile file) is this file's error, not
    // the caller's crash.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> Result<DecodedImage, DecodeError> {
            let mut decoder = reader.into_decoder().map_err(corrupt)?;
            let (width, height) = decoder.dimensions();
            limits.check(width, height)?;
            if width == 0 || height == 0 {
                return Err(DecodeError::Corrupt {
                    format: format_name(format),
                    message: "zero-sized image".into(),
                });
            }
            // A broken EXIF block is no reason to lose the picture: keep it as stored.
            let orientation = decoder
                .orientation()
                .unwrap_or(image::metadata::Orientation::NoTransforms);
            let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
            image.apply_orientation(orientation);
            Ok(DecodedImage {
                rgb: to_rgb(image),
                format,
                stored_width: width,
                stored_height: height,
                orientation: orientation.to_exif(),
            })
        },
    ));
    decoded.unwrap_or_else(|_| {
        Err(DecodeError::Corrupt {
            format: format_name(format),
            message: "the decoder failed on this file".into(),
        })
    })
}

fn format_name(format: ImageFormat) -> String {
    format
        .extensions_str()
        .first()
        .map_or_else(|| format!("{format:?}"), |e| e.to_uppercase())
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
        for (c, a, pillow) in [
            (0, 128, 127),
            (10, 37, 219),
            (200, 99, 234),
            (33, 1, 254),
            (77, 254, 78),
        ] {
            assert_eq!(composite_on_white(c, a), pillow, "c={c} a={a}");
        }
    }

    #[test]
    fn rejects_non_images() {
        let limits = DecodeLimits::default();
        assert!(matches!(
            decode_bytes(b"", &limits),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            decode_bytes(b"hello, not an image", &limits),
            Err(DecodeError::UnknownFormat)
        ));
    }

    #[test]
    fn caps_pixels_before_decoding() {
        let image = RgbImage::new(300, 200);
        let mut png = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let err = decode_bytes(
            &png,
            &DecodeLimits {
                max_pixels: 10_000,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooLarge {
                    width: 300,
                    height: 200,
                    ..
                }
            ),
            "{err}"
        );
        assert!(decode_bytes(&png, &DecodeLimits::default()).is_ok());
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        png
    }

    #[test]
    fn refuses_absurd_aspect_ratios_before_decoding() {
        let limits = DecodeLimits::default();
        for (w, h) in [(1, 300_000), (200_000, 3), (10_100, 100)] {
            let strip = png(w, h);
            let err = decode_bytes(&strip, &limits).unwrap_err();
            assert!(
                matches!(err, DecodeError::AspectRatio { .. }),
                "{w}x{h}: {err}"
            );
            assert!(matches!(
                probe(&strip, &limits, None),
                Err(DecodeError::AspectRatio { .. })
            ));
        }
        // A wide panorama is fine.
        assert!(decode_bytes(&png(2400, 100), &limits).is_ok());
    }

    #[test]
    fn probes_cost_without_decoding() {
        let p = probe(&png(400, 300), &DecodeLimits::default(), None).unwrap();
        assert_eq!((p.format, p.width, p.height), (ImageFormat::Png, 400, 300));
        assert_eq!(p.cost_bytes, 400 * 300 * 6);
        assert!(matches!(
            probe(b"nope", &DecodeLimits::default(), None),
            Err(DecodeError::UnknownFormat)
        ));
    }

    #[test]
    fn budget_refuses_what_it_cannot_hold() {
        let budget = DecodeBudget::new(100);
        let a = budget.try_acquire(60).unwrap();
        assert_eq!(budget.try_acquire(50).unwrap_err(), BudgetError::Busy);
        assert_eq!(
            budget.try_acquire(101).unwrap_err(),
            BudgetError::Exceeds {
                needed: 101,
                total: 100
            }
        );
        let b = budget.try_acquire(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop((a, b));
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn large_files_are_hashed_as_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (small, large) = (dir.path().join("small.png"), dir.path().join("large.tif"));
        std::fs::write(&small, b"small").unwrap();
        let content: Vec<u8> = (0..STREAM_ABOVE + 12345).map(|i| (i % 251) as u8).collect();
        std::fs::write(&large, &content).unwrap();
        let read = read_and_hash(&small, 1 << 30).unwrap();
        assert_eq!(
            (read.hash, read.size, read.whole, read.bytes.as_slice()),
            (ContentHash::of(b"small"), 5, true, &b"small"[..])
        );
        let read = read_and_hash(&large, 1 << 30).unwrap();
        assert_eq!(
            (read.hash, read.size, read.whole),
            (ContentHash::of(&content), content.len() as u64, false)
        );
        assert_eq!(read.bytes, content[..META_HEAD as usize]);
        assert!(matches!(
            read_and_hash(&large, STREAM_ABOVE),
            Err(DecodeError::FileTooLarge { .. })
        ));
    }

    #[test]
    fn reads_only_regular_files_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.jpg");
        std::fs::write(&file, vec![7u8; 1000]).unwrap();
        assert_eq!(read_file(&file, 1000).unwrap().len(), 1000);
        assert!(matches!(
            read_file(&file, 999),
            Err(DecodeError::FileTooLarge {
                size: 1000,
                limit: 999
            })
        ));
        assert_eq!(read_prefix(&file, 10).unwrap(), vec![7u8; 10]);
        assert!(matches!(
            read_file(dir.path(), 1000),
            Err(DecodeError::NotAFile("a folder"))
        ));
        let fifo = dir.path().join("pipe.jpg");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once: the FIFO is never read.
        assert!(matches!(
            read_file(&fifo, 1000),
            Err(DecodeError::NotAFile("a FIFO"))
        ));
    }
}
