//! Image preprocessing as `CLIPImageProcessor` does it: resize the shortest
//! side to the model's size, centre-crop, rescale to [0, 1], normalise with the
//! model's mean and std, channels first.
//!
//! The resize is Pillow's convolution resampler reproduced integer for
//! integer (separable, support scaled with the reduction so it antialiases,
//! 22-bit fixed-point coefficients, horizontal pass then vertical, rounding to
//! 8 bits after each pass), which is what OpenAI's CLIP preprocessing and
//! transformers' PIL backend run. transformers' default (torchvision) backend
//! differs from it by one level in under 1% of pixels.
//!
//! Input is an 8-bit RGB buffer; decoding files belongs to `library`.

use serde::Deserialize;

use super::{Error, Result};
pub use crate::common::pixels::{Resample, RgbView, resample};

pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// A filter by its `PIL.Image.Resampling` number.
fn resample_from_pil(code: u8) -> Result<Resample> {
    Ok(match code {
        0 => Resample::Nearest,
        1 => Resample::Lanczos,
        2 => Resample::Bilinear,
        3 => Resample::Bicubic,
        4 => Resample::Box,
        5 => Resample::Hamming,
        other => return Err(Error::Config(format!("unknown resample filter {other}"))),
    })
}

/// `size` / `crop_size` of a `preprocessor_config.json`: an int, or a dict.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(usize),
    Dict {
        #[serde(default)]
        shortest_edge: Option<usize>,
        #[serde(default)]
        height: Option<usize>,
        #[serde(default)]
        width: Option<usize>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResizeTo {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

#[derive(Debug, Deserialize)]
struct RawProcessorConfig {
    #[serde(default)]
    image_processor_type: Option<String>,
    #[serde(default)]
    processor_class: Option<String>,
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    size: Option<SizeSpec>,
    #[serde(default)]
    resample: Option<u8>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    crop_size: Option<SizeSpec>,
    #[serde(default)]
    do_rescale: Option<bool>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    image_mean: Option<Vec<f32>>,
    #[serde(default)]
    image_std: Option<Vec<f32>>,
    /// clipdex's own key: "round_half_even" for torchvision's centre crop
    /// (open_clip models fine-tuned and exported here).
    #[serde(default)]
    crop_offset: Option<String>,
}

/// The preprocessing a checkpoint asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    resize: Option<ResizeTo>,
    resample: Resample,
    crop: Option<(usize, usize)>,
    rescale: Option<f32>,
    mean: [f32; 3],
    std: [f32; 3],
    normalize: bool,
    /// Where a centre crop starts when the margin is odd.
    crop_offset: CropOffset,
    /// The model's input side; the pipeline must produce exactly this.
    image_size: usize,
}

/// How a centre crop places an odd margin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CropOffset {
    /// transformers: `(size - crop) // 2`.
    Floor,
    /// torchvision's `CenterCrop`: `int(round((size - crop) / 2))`, halves to even.
    RoundHalfEven,
}

impl CropOffset {
    fn of(self, margin: usize) -> usize {
        match self {
            CropOffset::Floor => margin / 2,
            // Python rounds x.5 to the even neighbour: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
            CropOffset::RoundHalfEven => {
                let half = margin / 2;
                if margin % 2 == 1 && half % 2 == 1 {
                    half + 1
                } else {
                    half
                }
            }
        }
    }
}

impl Preprocessor {
    /// CLIP's defaults for a model taking `image_size` pixels square.
    pub fn clip_default(image_size: usize) -> Self {
        Self {
            resize: Some(ResizeTo::ShortestEdge(image_size)),
            resample: Resample::Bicubic,
            crop: Some((image_size, image_size)),
            rescale: Some(1.0 / 255.0),
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
            normalize: true,
            crop_offset: CropOffset::Floor,
            image_size,
        }
    }

    /// open_clip's eval transform (torchvision on PIL images): resize the
    /// shortest side and centre-crop, or squash to the square; then
    /// `ToTensor` and `Normalize`.
    pub fn torchvision(
        image_size: usize,
        squash: bool,
        resample: Resample,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Self {
        let base = Self {
            resample,
            mean,
            std,
            crop_offset: CropOffset::RoundHalfEven,
            ..Self::clip_default(image_size)
        };
        if squash {
            Self {
                resize: Some(ResizeTo::Exact {
                    height: image_size,
                    width: image_size,
                }),
                crop: None,
                ..base
            }
        } else {
            base
        }
    }

    /// `SiglipImageProcessor`'s defaults: squash to the model's square (no
    /// crop), mean and std 0.5.
    pub fn siglip_default(image_size: usize) -> Self {
        Self {
            resize: Some(ResizeTo::Exact {
                height: image_size,
                width: image_size,
            }),
            crop: None,
            mean: [0.5; 3],
            std: [0.5; 3],
            ..Self::clip_default(image_size)
        }
    }

    /// The defaults of a model family, for checkpoints without a `preprocessor_config.json`.
    pub fn default_for(family: super::Family, image_size: usize) -> Self {
        match family {
            super::Family::Clip => Self::clip_default(image_size),
            super::Family::Siglip => Self::siglip_default(image_size),
        }
    }

    /// Reads a `preprocessor_config.json`; what it leaves out is the default
    /// of the processor it names (SigLIP's or, for any other, CLIP's).
    pub fn from_json(text: &str, image_size: usize) -> Result<Self> {
        let raw: RawProcessorConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("preprocessor_config.json: {e}")))?;
        let siglip = [&raw.image_processor_type, &raw.processor_class]
            .iter()
            .any(|name| name.as_deref().is_some_and(|n| n.starts_with("Siglip")));
        let default = if siglip {
            Self::siglip_default(image_size)
        } else {
            Self::clip_default(image_size)
        };
        let resize = match (raw.do_resize.unwrap_or(true), raw.size) {
            (false, _) => None,
            (true, None) => default.resize,
            (true, Some(SizeSpec::Int(n))) => Some(ResizeTo::ShortestEdge(n)),
            (
                true,
                Some(SizeSpec::Dict {
                    shortest_edge: Some(n),
                    ..
                }),
            ) => Some(ResizeTo::ShortestEdge(n)),
            (
                true,
                Some(SizeSpec::Dict {
                    height: Some(height),
                    width: Some(width),
                    ..
                }),
            ) => Some(ResizeTo::Exact { height, width }),
            (true, Some(other)) => {
                return Err(Error::Config(format!(
                    "preprocessor size {other:?} is not supported"
                )));
            }
        };
        let crop = match (
            raw.do_center_crop.unwrap_or(default.crop.is_some()),
            raw.crop_size,
        ) {
            (false, _) => None,
            (true, None) => default.crop,
            (true, Some(SizeSpec::Int(n))) => Some((n, n)),
            (
                true,
                Some(SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }),
            ) => Some((h, w)),
            (true, Some(other)) => {
                return Err(Error::Config(format!(
                    "preprocessor crop_size {other:?} is not supported"
                )));
            }
        };
        let triple = |v: Option<Vec<f32>>, d: [f32; 3], name: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(d),
                Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                Some(v) if v.len() == 1 => Ok([v[0]; 3]),
                Some(v) => Err(Error::Config(format!(
                    "{name} has {} values, expected 3",
                    v.len()
                ))),
            }
        };
        let std = triple(raw.image_std, default.std, "image_std")?;
        if std.iter().any(|&s| s == 0.0) {
            return Err(Error::Config("image_std has a zero".into()));
        }
        let processor = Self {
            resize,
            resample: raw
                .resample
                .map(resample_from_pil)
                .transpose()?
                .unwrap_or(Resample::Bicubic),
            crop,
            rescale: if raw.do_rescale.unwrap_or(true) {
                Some(raw.rescale_factor.unwrap_or(1.0 / 255.0) as f32)
            } else {
                None
            },
            mean: triple(raw.image_mean, default.mean, "image_mean")?,
            std,
            normalize: raw.do_normalize.unwrap_or(true),
            crop_offset: match raw.crop_offset.as_deref() {
                None | Some("floor") => CropOffset::Floor,
                Some("round_half_even") => CropOffset::RoundHalfEven,
                Some(other) => {
                    return Err(Error::Config(format!(
                        "preprocessor crop_offset {other:?} is not supported"
                    )));
                }
            },
            image_size,
        };
        // Check the pipeline yields what the model takes, whatever the image.
        let probe = processor.output_size(1000, 700);
        let probe2 = processor.output_size(700, 1000);
        if probe != (image_size, image_size) || probe2 != (image_size, image_size) {
            return Err(Error::Config(format!(
                "preprocessor_config.json produces {}x{} images, the model takes {image_size}x{image_size}",
                probe.0, probe.1
            )));
        }
        Ok(processor)
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// The `preprocessor_config.json` transformers reads for this pipeline.
    pub fn to_json(&self) -> String {
        let (size, do_resize) = match self.resize {
            Some(ResizeTo::ShortestEdge(n)) => (serde_json::json!({"shortest_edge": n}), true),
            Some(ResizeTo::Exact { height, width }) => {
                (serde_json::json!({"height": height, "width": width}), true)
            }
            None => (serde_json::json!({"shortest_edge": self.image_size}), false),
        };
        let resample = match self.resample {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        };
        let (ch, cw) = self.crop.unwrap_or((self.image_size, self.image_size));
        let mut value = serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": do_resize,
            "size": size,
            "resample": resample,
            "do_center_crop": self.crop.is_some(),
            "crop_size": {"height": ch, "width": cw},
            "do_rescale": self.rescale.is_some(),
            "rescale_factor": self.rescale.unwrap_or(1.0 / 255.0),
            "do_normalize": self.normalize,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": true,
        });
        if self.crop_offset == CropOffset::RoundHalfEven {
            value["crop_offset"] = "round_half_even".into();
        }
        serde_json::to_string_pretty(&value).expect("a preprocessor serialises")
    }

    pub fn mean(&self) -> [f32; 3] {
        self.mean
    }

    pub fn std(&self) -> [f32; 3] {
        self.std
    }

    /// Size after resizing an image of `width` x `height`, as (width, height).
    fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            None => (width, height),
            Some(ResizeTo::Exact { height, width }) => (width, height),
            Some(ResizeTo::ShortestEdge(size)) => {
                // transformers' get_resize_output_image_size: int(size * long / short).
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = ((size * long) as f64 / short as f64) as usize;
                if width <= height {
                    (size, new_long)
                } else {
                    (new_long, size)
                }
            }
        }
    }

    /// Final (width, height) of an image of `width` x `height`.
    fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.crop {
            Some((h, w)) => (w, h),
            None => self.resized_size(width, height),
        }
    }

    /// Resizes and centre-crops: the 8-bit stage of the pipeline, (h, w, 3) interleaved.
    pub fn resize_and_crop(&self, image: RgbView) -> Vec<u8> {
        match self.resize(image) {
            Some((data, width, height)) => self.crop(RgbView {
                width,
                height,
                data: &data,
            }),
            None => self.crop(image),
        }
    }

    /// The resize step alone: the image at its pre-crop size, `None` when it
    /// already has that size. (The indexer makes thumbnails from this.)
    pub fn resize(&self, image: RgbView) -> Option<(Vec<u8>, usize, usize)> {
        let (rw, rh) = self.resized_size(image.width, image.height);
        let (rw, rh) = (rw.max(1), rh.max(1));
        ((rw, rh) != (image.width, image.height))
            .then(|| (resample(image, rw, rh, self.resample), rw, rh))
    }

    /// The crop step alone, on a resized image.
    pub fn crop(&self, resized: RgbView) -> Vec<u8> {
        match self.crop {
            Some((ch, cw)) => center_crop(
                resized.data,
                resized.width,
                resized.height,
                cw,
                ch,
                self.crop_offset,
            ),
            None => resized.data.to_vec(),
        }
    }

    /// The whole pipeline: (3, size, size) channels-first floats.
    pub fn preprocess(&self, image: RgbView) -> Vec<f32> {
        let crop = self.resize_and_crop(image);
        let mut out = vec![0f32; crop.len()];
        self.normalize_into(&crop, &mut out);
        out
    }

    /// Rescales and normalises an 8-bit (h, w, 3) crop into (3, h, w) floats.
    pub fn normalize_into(&self, crop: &[u8], out: &mut [f32]) {
        let plane = crop.len() / 3;
        for c in 0..3 {
            // (x * rescale - mean) / std, folded as torchvision's fused path does.
            let (scale, mean, std) = match (self.rescale, self.normalize) {
                (Some(r), true) => (1.0, self.mean[c] / r, self.std[c] / r),
                (Some(r), false) => (r, 0.0, 1.0),
                (None, true) => (1.0, self.mean[c], self.std[c]),
                (None, false) => (1.0, 0.0, 1.0),
            };
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = (crop[i * 3 + c] as f32 * scale - mean) / std;
            }
        }
    }
}

/// Centre crop, padding with black where the crop is larger (torchvision's rule).
fn center_crop(
    data: &[u8],
    width: usize,
    height: usize,
    cw: usize,
    ch: usize,
    offset: CropOffset,
) -> Vec<u8> {
    let mut out = vec![0u8; cw * ch * 3];
    // Offsets of the crop in the (possibly padded) image.
    let pad_left = if cw > width { (cw - width) / 2 } else { 0 };
    let pad_top = if ch > height { (ch - height) / 2 } else { 0 };
    let left = if cw > width { 0 } else { offset.of(width - cw) };
    let top = if ch > height {
        0
    } else {
        offset.of(height - ch)
    };
    let copy_w = cw.min(width);
    for y in 0..ch.min(height) {
        let src = ((top + y) * width + left) * 3;
        let dst = ((pad_top + y) * cw + pad_left) * 3;
        out[dst..dst + copy_w * 3].copy_from_slice(&data[src..src + copy_w * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3)
            .map(|i| ((i * 37 + i / 7) % 256) as u8)
            .collect()
    }

    #[test]
    fn shortest_edge_sizes_match_transformers() {
        let p = Preprocessor::clip_default(224);
        assert_eq!(p.resized_size(640, 427), (335, 224));
        assert_eq!(p.resized_size(2560, 3837), (224, 335));
        assert_eq!(p.resized_size(512, 512), (224, 224));
        assert_eq!(p.resized_size(100, 50), (448, 224));
    }

    #[test]
    fn constant_image_stays_constant() {
        let data = vec![77u8; 300 * 200 * 3];
        let view = RgbView::new(300, 200, &data).unwrap();
        for filter in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
        ] {
            let out = resample(view, 97, 61, filter);
            assert!(out.iter().all(|&v| v == 77), "{filter:?}");
        }
    }

    #[test]
    fn same_size_is_identity_and_crop_is_centred() {
        let data = gradient(10, 6);
        let view = RgbView::new(10, 6, &data).unwrap();
        assert_eq!(resample(view, 10, 6, Resample::Bicubic), data);
        let crop = center_crop(&data, 10, 6, 4, 2, CropOffset::Floor);
        assert_eq!(&crop[..12], &data[(2 * 10 + 3) * 3..(2 * 10 + 7) * 3]);
    }

    #[test]
    fn crop_larger_than_image_pads_black() {
        let data = vec![200u8; 2 * 2 * 3];
        let crop = center_crop(&data, 2, 2, 4, 4, CropOffset::Floor);
        assert_eq!(crop[(4 + 1) * 3], 200);
        assert_eq!(crop[0], 0);
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let p = Preprocessor::clip_default(1);
        let mut out = [0f32; 3];
        p.normalize_into(&[255, 0, 128], &mut out);
        assert!((out[0] - (1.0 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]).abs() < 1e-5);
        assert!((out[1] + OPENAI_CLIP_MEAN[1] / OPENAI_CLIP_STD[1]).abs() < 1e-5);
    }

    #[test]
    fn writes_what_it_reads() {
        let p = Preprocessor::from_json(r#"{"size": 64, "crop_size": 64, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}"#, 64).unwrap();
        assert_eq!(Preprocessor::from_json(&p.to_json(), 64).unwrap(), p);
    }

    #[test]
    fn reads_processor_configs() {
        let p = Preprocessor::from_json(r#"{"size": 224, "crop_size": 224, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}"#, 224).unwrap();
        assert_eq!(p.mean(), [0.5; 3]);
        let p = Preprocessor::from_json(
            r#"{"size": {"height": 64, "width": 64}, "do_center_crop": false, "resample": 2}"#,
            64,
        )
        .unwrap();
        assert_eq!(p.resample, Resample::Bilinear);
        assert!(
            Preprocessor::from_json(
                r#"{"size": {"shortest_edge": 64}, "crop_size": {"height": 32, "width": 32}}"#,
                64
            )
            .is_err()
        );
        assert!(Preprocessor::from_json(r#"{"resample": 9}"#, 224).is_err());
        // SigLIP's processor: what it leaves out is SigLIP's default, not CLIP's.
        let p = Preprocessor::from_json(r#"{"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}}"#, 64).unwrap();
        assert_eq!(p, Preprocessor::siglip_default(64));
    }
}
