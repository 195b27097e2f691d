//! Decoding and preprocessing against transformers' default `CLIPImageProcessor`:
//! real photos at 224 px and one image in every supported format at 64 px,
//! compared at the 8-bit stage (after resize and crop, before normalisation).

use std::collections::BTreeMap;

use candle_core::Device;
use clipdex::library::{DecodeError, DecodeLimits, decode_bytes, decode_file};
use clipdex::model::Preprocessor;

use crate::common::{fixtures, shared_photos};

/// Most any pixel may differ from the default (torchvision) backend, in 8-bit
/// levels: clipdex reproduces Pillow's resize, which torchvision's differs
/// from by one level in under 1% of pixels.
const MAX_LEVELS: u8 = 1;
/// Mean absolute difference over all pixels, in levels.
const MEAN_LEVELS: f64 = 0.01;

struct Stats {
    max: u8,
    mean: f64,
}

fn compare(ours: &[u8], want: &[u8]) -> Stats {
    assert_eq!(ours.len(), want.len());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in ours.iter().zip(want) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        sum += d as u64;
    }
    Stats {
        max,
        mean: sum as f64 / ours.len() as f64,
    }
}

fn cases() -> BTreeMap<String, String> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("preprocess.json")).unwrap())
        .unwrap()
}

#[test]
fn preprocessing_matches_reference() {
    let tensors =
        candle_core::safetensors::load(fixtures().join("preprocess.safetensors"), &Device::Cpu)
            .unwrap();
    let limits = DecodeLimits::default();
    let mut checked = 0;
    let mut exact = 0;
    for (key, name) in cases() {
        let size: usize = key.split('/').next().unwrap().parse().unwrap();
        let path = if size == 224 {
            shared_photos().join(&name)
        } else {
            fixtures().join("images").join(&name)
        };
        let decoded = decode_file(&path, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        let view = decoded.view();
        let ours = Preprocessor::clip_default(size).resize_and_crop(view);
        let want = tensors[&key]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let s = compare(&ours, &want);
        eprintln!("{key} {name}: max {} levels, mean {:.4}", s.max, s.mean);
        assert!(
            s.max <= MAX_LEVELS && s.mean <= MEAN_LEVELS,
            "{name}: max {} levels, mean {:.4}",
            s.max,
            s.mean
        );
        // Against the PIL backend (same decoder, same resampler): identical.
        if let Some(pil) = tensors.get(&format!("{key}/pil")) {
            let pil = pil.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let s = compare(&ours, &pil);
            assert_eq!(
                s.max, 0,
                "{name}: differs from CLIPImageProcessorPil by up to {} levels",
                s.max
            );
            exact += 1;
        }
        checked += 1;
    }
    assert!(
        checked >= 15 && exact >= 10,
        "only {checked} images checked, {exact} against PIL"
    );
}

#[test]
fn sixteen_bit_grey_decodes_like_its_eight_bit_twin() {
    let limits = DecodeLimits::default();
    let wide = decode_file(&fixtures().join("images/grey16.png"), &limits).unwrap();
    let narrow = decode_file(&fixtures().join("images/grey.png"), &limits).unwrap();
    assert_eq!(wide.rgb.dimensions(), narrow.rgb.dimensions());
    let s = compare(wide.rgb.as_raw(), narrow.rgb.as_raw());
    assert!(
        s.max <= 1,
        "16-bit grey differs from 8-bit by up to {} levels",
        s.max
    );
}

#[test]
fn exif_orientation_is_applied() {
    let limits = DecodeLimits::default();
    let upright = decode_file(&fixtures().join("images/photo.jpg"), &limits).unwrap();
    for n in [3, 6, 8] {
        let turned = decode_file(
            &fixtures().join(format!("images/orientation{n}.jpg")),
            &limits,
        )
        .unwrap();
        assert_eq!(
            turned.rgb.dimensions(),
            upright.rgb.dimensions(),
            "orientation {n}"
        );
        if n != 3 {
            assert_eq!(
                (turned.stored_width, turned.stored_height),
                (upright.stored_height, upright.stored_width)
            );
        }
        // Same picture, up to JPEG re-encoding of the rotated pixels.
        let s = compare(turned.rgb.as_raw(), upright.rgb.as_raw());
        assert!(
            s.mean < 3.0,
            "orientation {n}: mean difference {:.2} levels",
            s.mean
        );
    }
}

#[test]
fn bad_files_give_clear_errors() {
    let limits = DecodeLimits::default();
    let images = fixtures().join("images");
    assert!(matches!(
        decode_file(&images.join("empty.jpg"), &limits),
        Err(DecodeError::Empty)
    ));
    assert!(matches!(
        decode_file(&images.join("text.jpg"), &limits),
        Err(DecodeError::UnknownFormat)
    ));
    let err = decode_file(&images.join("truncated.jpg"), &limits).unwrap_err();
    assert!(
        matches!(err, DecodeError::Corrupt { .. }),
        "truncated JPEG: {err}"
    );
    assert!(matches!(
        decode_file(&images.join("no-such-file.jpg"), &limits),
        Err(DecodeError::Io(_))
    ));
    // Every prefix of a valid PNG fails cleanly, never panics.
    let png = std::fs::read(images.join("photo.png")).unwrap();
    for cut in (0..png.len()).step_by(997) {
        assert!(
            decode_bytes(&png[..cut], &limits).is_err(),
            "PNG cut at {cut} decoded"
        );
    }
}
