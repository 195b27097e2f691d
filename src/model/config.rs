//! CLIP configuration, read from a Hugging Face `config.json` (`CLIPConfig`).
//!
//! Every architecture parameter comes from the file; the defaults are those of
//! transformers' `CLIPTextConfig` / `CLIPVisionConfig`, so a config that omits a
//! field means what it means to the reference implementation.

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// The activation between the two MLP layers of every encoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI's checkpoints.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact, erf-based GELU (LAION and most others).
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

/// The text tower (`text_config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

/// The image tower (`vision_config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Patches along one side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Sequence length: one class token plus one token per patch.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// A whole CLIP model: both towers and the joint embedding space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

/// The file as written: sub-configs may be missing, null, or (older
/// checkpoints) given again as `*_config_dict`, which then wins.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    text_config: Option<serde_json::Value>,
    #[serde(default)]
    text_config_dict: Option<serde_json::Value>,
    #[serde(default)]
    vision_config: Option<serde_json::Value>,
    #[serde(default)]
    vision_config_dict: Option<serde_json::Value>,
    #[serde(default)]
    projection_dim: Option<usize>,
    #[serde(default)]
    logit_scale_init_value: Option<f64>,
}

impl ClipConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(kind) = raw.model_type.as_deref() {
            if kind != "clip" {
                return Err(Error::Config(format!(
                    "model_type is {kind:?}, clipdex reads CLIP checkpoints (model_type \"clip\")"
                )));
            }
        }
        // transformers rebuilds the sub-config from `*_config_dict` alone when present.
        let text = raw.text_config_dict.or(raw.text_config);
        let vision = raw.vision_config_dict.or(raw.vision_config);
        let config = Self {
            text_config: sub_config(text, "text_config")?,
            vision_config: sub_config(vision, "vision_config")?,
            projection_dim: raw.projection_dim.unwrap_or(512),
            logit_scale_init_value: raw.logit_scale_init_value.unwrap_or(2.6592),
        };
        config.validate()?;
        Ok(config)
    }

    /// The ViT-B/32 architecture of `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        Self {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }

    /// The ViT-B/16 architecture of `openai/clip-vit-base-patch16`.
    pub fn vit_base_patch16() -> Self {
        let mut config = Self::vit_base_patch32();
        config.vision_config.patch_size = 16;
        config
    }

    /// The ViT-L/14 architecture of `openai/clip-vit-large-patch14`.
    pub fn vit_large_patch14() -> Self {
        Self {
            text_config: TextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_attention_heads: 12,
                ..TextConfig::default()
            },
            vision_config: VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                patch_size: 14,
                ..VisionConfig::default()
            },
            projection_dim: 768,
            logit_scale_init_value: 2.6592,
        }
    }

    /// A small model that trains on a CPU: a ViT of `layers` blocks of
    /// `width` on `image` px images in `patch` px patches, a text transformer
    /// of the same size reading 32 tokens.
    pub fn small(image: usize, patch: usize, width: usize, layers: usize) -> Self {
        let heads = (width / 32).max(1);
        Self {
            text_config: TextConfig {
                hidden_size: width,
                intermediate_size: 4 * width,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                max_position_embeddings: 32,
                hidden_act: Activation::Gelu,
                ..TextConfig::default()
            },
            vision_config: VisionConfig {
                hidden_size: width,
                intermediate_size: 4 * width,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                image_size: image,
                patch_size: patch,
                hidden_act: Activation::Gelu,
                ..VisionConfig::default()
            },
            projection_dim: width,
            logit_scale_init_value: (1.0f64 / 0.07).ln(),
        }
    }

    /// Names of the presets, for help texts.
    pub const PRESETS: &'static [&'static str] = &["tiny-32", "small-32", "small-64", "vit-b-32", "vit-b-16", "vit-l-14"];

    /// Looks up a named preset.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            // About 1.1 M parameters outside the token table: for tests.
            "tiny-32" => Some(Self::small(32, 8, 64, 2)),
            // About 1.6 M / 1.6 M parameters per tower: Fashion-MNIST-sized data.
            "small-32" => Some(Self::small(32, 4, 128, 4)),
            "small-64" => Some(Self::small(64, 8, 128, 4)),
            "vit-b-32" | "ViT-B-32" | "ViT-B/32" => Some(Self::vit_base_patch32()),
            "vit-b-16" | "ViT-B-16" | "ViT-B/16" => Some(Self::vit_base_patch16()),
            "vit-l-14" | "ViT-L-14" | "ViT-L/14" => Some(Self::vit_large_patch14()),
            _ => None,
        }
    }

    /// Writes the config in the layout transformers reads.
    pub fn to_json(&self) -> String {
        let value = serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": with_model_type(&self.text_config, "clip_text_model"),
            "vision_config": with_model_type(&self.vision_config, "clip_vision_model"),
        });
        serde_json::to_string_pretty(&value).expect("a config always serialises")
    }

    fn validate(&self) -> Result<()> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let checks = [
            (t.hidden_size > 0 && t.num_attention_heads > 0, "text hidden_size and num_attention_heads must be positive"),
            (t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads == 0,
                "text hidden_size must be a multiple of num_attention_heads"),
            (v.hidden_size > 0 && v.num_attention_heads > 0, "vision hidden_size and num_attention_heads must be positive"),
            (v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads == 0,
                "vision hidden_size must be a multiple of num_attention_heads"),
            (v.patch_size > 0 && v.image_size >= v.patch_size, "vision patch_size must be positive and at most image_size"),
            (v.num_channels == 3, "only 3-channel (RGB) vision towers are supported"),
            (t.max_position_embeddings >= 2, "text max_position_embeddings must leave room for start and end tokens"),
            (self.projection_dim > 0, "projection_dim must be positive"),
        ];
        for (ok, message) in checks {
            if !ok {
                return Err(Error::Config(message.to_string()));
            }
        }
        Ok(())
    }
}

fn sub_config<T: for<'de> Deserialize<'de> + Default>(value: Option<serde_json::Value>, name: &str) -> Result<T> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(mut value) => {
            // transformers writes nulls for unset optional fields; they mean "default".
            if let serde_json::Value::Object(map) = &mut value {
                map.retain(|_, v| !v.is_null());
            }
            serde_json::from_value(value).map_err(|e| Error::Config(format!("{name}: {e}")))
        }
    }
}

fn with_model_type<T: Serialize>(config: &T, model_type: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(config).expect("a config always serialises");
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("model_type".into(), model_type.into());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vit_b_32() {
        let config = ClipConfig::from_json(r#"{"model_type": "clip"}"#).unwrap();
        assert_eq!(config, ClipConfig::vit_base_patch32());
    }

    #[test]
    fn config_dict_wins_and_nulls_mean_default() {
        let text = r#"{
            "text_config": {"hidden_size": 64, "num_attention_heads": 4},
            "text_config_dict": {"hidden_size": 128, "num_attention_heads": 8, "hidden_act": "gelu", "eos_token_id": null},
            "vision_config": {"patch_size": 16, "layer_norm_eps": null},
            "projection_dim": 256
        }"#;
        let config = ClipConfig::from_json(text).unwrap();
        assert_eq!(config.text_config.hidden_size, 128);
        assert_eq!(config.text_config.hidden_act, Activation::Gelu);
        assert_eq!(config.text_config.eos_token_id, Some(49407));
        assert_eq!(config.vision_config.patch_size, 16);
        assert_eq!(config.vision_config.layer_norm_eps, 1e-5);
        assert_eq!(config.projection_dim, 256);
    }

    #[test]
    fn rejects_bad_configs() {
        for text in [
            r#"{"model_type": "siglip"}"#,
            r#"{"text_config": {"hidden_size": 30, "num_attention_heads": 4}}"#,
            r#"{"vision_config": {"hidden_act": "tanh"}}"#,
            r#"{"vision_config": {"patch_size": 0}}"#,
            r#"not json"#,
        ] {
            assert!(matches!(ClipConfig::from_json(text), Err(Error::Config(_))), "{text}");
        }
    }

    #[test]
    fn round_trips_through_json() {
        let config = ClipConfig::vit_large_patch14();
        assert_eq!(ClipConfig::from_json(&config.to_json()).unwrap(), config);
    }
}
