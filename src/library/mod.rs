//! The photo library: walking a folder, reading image files into upright RGB
//! pixels, their metadata and captions, and thumbnails.
//!
//! Owns everything that touches files and image formats; the model sees only
//! RGB buffers.

pub mod decode;
mod jpeg;
pub mod meta;
pub mod scan;
pub mod thumb;

pub use decode::{decode_bytes, decode_bytes_scaled, decode_file, DecodeError, DecodeLimits, DecodedImage};
