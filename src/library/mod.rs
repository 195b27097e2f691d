//! The photo library: reading image files into pixels.
//!
//! Owns everything that touches image formats; the model sees only RGB
//! buffers.

pub mod decode;
mod jpeg;

pub use decode::{decode_bytes, decode_file, DecodeError, DecodeLimits, DecodedImage};
