//! What is known of a library file without reading it, and where a caption came from.

use serde::{Deserialize, Serialize};

/// Size and modification time: what decides whether a file must be read again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSig {
    pub size: u64,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Where a caption came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptionSource {
    /// A `.txt` file beside the image.
    Sidecar,
    /// EXIF ImageDescription.
    Exif,
    /// XMP dc:description.
    Xmp,
}
