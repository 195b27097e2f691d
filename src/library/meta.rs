//! What a photo says about itself: EXIF date taken, camera, orientation and
//! description, the XMP description, and the caption clipdex shows and
//! searches (a sidecar `.txt` first, then XMP, then EXIF).

use std::io::Cursor;
use std::path::Path;

use crate::common::CaptionSource;

/// Longest caption kept, in characters.
const MAX_CAPTION: usize = 2000;

/// Descriptions cameras write by default, which describe nothing.
const PLACEHOLDER_DESCRIPTIONS: &[&str] = &[
    "olympus digital camera",
    "sony dsc",
    "dcim",
    "default",
    "untitled",
    "image",
    "picture",
    "samsung",
    "kodak digital still camera",
    "minolta digital camera",
    "digital camera",
    "exif_jpeg_picture",
    "lg electronics",
];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhotoMeta {
    /// `YYYY-MM-DDTHH:MM:SS`.
    pub taken: Option<String>,
    pub camera_make: Option<String>,
    pub camera_model: Option<String>,
    pub orientation: u8,
    pub exif_description: Option<String>,
    pub xmp_description: Option<String>,
}

fn clean(s: &str) -> Option<String> {
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    let s: String = s
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .take(MAX_CAPTION)
        .collect();
    (!s.is_empty()).then_some(s)
}

fn ascii(field: &exif::Field) -> Option<String> {
    match &field.value {
        exif::Value::Ascii(parts) => {
            let text: Vec<String> = parts
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            clean(&text.join(" "))
        }
        exif::Value::Undefined(bytes, _) | exif::Value::Byte(bytes) => {
            clean(&String::from_utf8_lossy(bytes))
        }
        _ => None,
    }
}

/// Reads EXIF and XMP from a file's bytes; absent or broken metadata gives defaults.
pub fn read_meta(bytes: &[u8]) -> PhotoMeta {
    let mut meta = PhotoMeta {
        orientation: 1,
        ..Default::default()
    };
    if let Ok(exif) = exif::Reader::new().read_from_container(&mut Cursor::new(bytes)) {
        let get = |tag| exif.get_field(tag, exif::In::PRIMARY);
        meta.taken = get(exif::Tag::DateTimeOriginal)
            .or_else(|| get(exif::Tag::DateTimeDigitized))
            .or_else(|| get(exif::Tag::DateTime))
            .and_then(ascii)
            .and_then(|d| exif_date(&d));
        meta.camera_make = get(exif::Tag::Make).and_then(ascii);
        meta.camera_model = get(exif::Tag::Model).and_then(ascii);
        meta.orientation = get(exif::Tag::Orientation)
            .and_then(|f| f.value.get_uint(0))
            .filter(|o| (1..=8).contains(o))
            .map_or(1, |o| o as u8);
        meta.exif_description = get(exif::Tag::ImageDescription)
            .and_then(ascii)
            .filter(|d| !PLACEHOLDER_DESCRIPTIONS.contains(&d.to_lowercase().as_str()));
    }
    meta.xmp_description = xmp_description(bytes);
    meta
}

/// `2019:07:14 12:30:05` to `2019-07-14T12:30:05`; `None` for zeroed or malformed dates.
///
/// The text is untrusted (any bytes a camera or an editor wrote), so it is
/// read character by character, never sliced at a byte offset.
fn exif_date(s: &str) -> Option<String> {
    let chars: Vec<char> = s.trim().chars().take(19).collect();
    let digits = |r: std::ops::Range<usize>| {
        chars
            .get(r)
            .filter(|c| c.iter().all(char::is_ascii_digit))
            .map(|c| c.iter().collect::<String>())
    };
    // Separators are ':' by the standard; some writers use '-', '/' or '.'.
    let separated = |at: &[usize]| {
        at.iter()
            .all(|&i| chars.get(i).is_some_and(char::is_ascii_punctuation))
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if y == "0000" || !separated(&[4, 7]) {
        return None;
    }
    let time = match (digits(11..13), digits(14..16), digits(17..19)) {
        (Some(h), Some(mi), Some(sec)) if separated(&[13, 16]) => format!("{h}:{mi}:{sec}"),
        _ => "00:00:00".to_string(),
    };
    let out = format!("{y}-{m}-{d}T{time}");
    crate::common::time::parse_datetime(&out).map(|_| out)
}

/// The `dc:description` of an XMP packet embedded anywhere in the file.
fn xmp_description(bytes: &[u8]) -> Option<String> {
    const START: &[u8] = b"<dc:description";
    let at = bytes.windows(START.len()).position(|w| w == START)?;
    let rest = &bytes[at..bytes.len().min(at + 64 * 1024)];
    let end = rest.windows(17).position(|w| w == b"</dc:description>")?;
    let block = String::from_utf8_lossy(&rest[..end]);
    // <dc:description><rdf:Alt><rdf:li xml:lang="x-default">text</rdf:li></rdf:Alt>
    let li = block.find("<rdf:li")?;
    let open_end = block[li..].find('>')? + li + 1;
    let close = block[open_end..].find("</rdf:li>")? + open_end;
    clean(&unescape_xml(&block[open_end..close]))
}

fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The caption of a photo: its sidecar file, else XMP, else EXIF.
pub fn caption(
    sidecar: Option<&Path>,
    meta: &PhotoMeta,
) -> (Option<String>, Option<CaptionSource>) {
    // Only the start of a sidecar is read: a multi-GB `.txt` costs no more than a short one.
    let read = |p: &Path| super::decode::read_prefix(p, super::decode::MAX_SIDECAR_BYTES).ok();
    if let Some(text) = sidecar
        .and_then(read)
        .and_then(|b| clean(&String::from_utf8_lossy(&b)))
    {
        return (Some(text), Some(CaptionSource::Sidecar));
    }
    if let Some(text) = &meta.xmp_description {
        return (Some(text.clone()), Some(CaptionSource::Xmp));
    }
    if let Some(text) = &meta.exif_description {
        return (Some(text.clone()), Some(CaptionSource::Exif));
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_dates_become_iso() {
        assert_eq!(
            exif_date("2019:07:14 12:30:05").as_deref(),
            Some("2019-07-14T12:30:05")
        );
        assert_eq!(
            exif_date("2019:07:14").as_deref(),
            Some("2019-07-14T00:00:00")
        );
        assert_eq!(exif_date("0000:00:00 00:00:00"), None);
        assert_eq!(exif_date("    :  :     :  :  "), None);
        // Non-ASCII where a separator or digit should be: once a panic.
        assert_eq!(exif_date("2019é07:14 12:30:05"), None);
        assert_eq!(exif_date("20é:07:14 12:30:05"), None);
        assert_eq!(exif_date("2019:07:1é 12:30:05"), None);
        assert_eq!(
            exif_date("2019:07:14 12:3é:05").as_deref(),
            Some("2019-07-14T00:00:00")
        );
        assert_eq!(exif_date("2019:02:30 00:00:00"), None);
        assert_eq!(
            exif_date("2019/07/14 12.30.05").as_deref(),
            Some("2019-07-14T12:30:05")
        );
    }

    #[test]
    fn finds_xmp_descriptions() {
        let xmp = br#"junk<x:xmpmeta><rdf:Description><dc:description><rdf:Alt>
            <rdf:li xml:lang="x-default">Two cats &amp; a dog</rdf:li></rdf:Alt></dc:description>"#;
        assert_eq!(xmp_description(xmp).as_deref(), Some("Two cats & a dog"));
        assert_eq!(xmp_description(b"no xmp here"), None);
    }

    #[test]
    fn sidecar_beats_embedded_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let side = dir.path().join("a.txt");
        std::fs::write(&side, "  a red kite over the sea \n").unwrap();
        let meta = PhotoMeta {
            exif_description: Some("exif".into()),
            ..Default::default()
        };
        assert_eq!(
            caption(Some(&side), &meta),
            (
                Some("a red kite over the sea".into()),
                Some(CaptionSource::Sidecar)
            )
        );
        assert_eq!(
            caption(None, &meta),
            (Some("exif".into()), Some(CaptionSource::Exif))
        );
        // A huge sidecar is read only as far as a caption needs.
        std::fs::write(&side, "word ".repeat(1_000_000)).unwrap();
        let (text, _) = caption(Some(&side), &meta);
        assert_eq!(text.unwrap().chars().count(), MAX_CAPTION);
        std::fs::write(&side, "   ").unwrap();
        assert_eq!(caption(Some(&side), &PhotoMeta::default()), (None, None));
    }
}
