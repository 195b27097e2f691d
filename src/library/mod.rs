//! The photo library: walking a folder, reading image files into upright RGB
//! pixels, their metadata and captions, and thumbnails.
//!
//! Owns everything that touches files and image formats; the model sees only
//! RGB buffers.

pub mod decode;
mod jpeg;
pub mod memory;
pub mod meta;
pub mod scan;
pub mod thumb;

pub use decode::{
    BudgetError, BudgetPermit, DecodeBudget, DecodeError, DecodeLimits, DecodedImage, FileRead,
    MAX_SIDECAR_BYTES, Probe, decode_bytes, decode_bytes_scaled, decode_file, open_regular, probe,
    read_and_hash, read_file, read_prefix,
};

/// The MIME type of a format name as the index stores it (`jpeg`, `png`, ...).
pub fn mime_type(format: &str) -> &'static str {
    match format {
        "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tiff" => "image/tiff",
        _ => "application/octet-stream",
    }
}
