//! Model configuration, read from a Hugging Face `config.json`: `CLIPConfig`
//! (`model_type: "clip"`) or `SiglipConfig` (`"siglip"`, SigLIP and the
//! fixed-resolution SigLIP 2 checkpoints).
//!
//! Every architecture parameter comes from the file; the defaults are those of
//! transformers' `CLIPTextConfig` / `CLIPVisionConfig` or `SiglipTextConfig` /
//! `SiglipVisionConfig`, so a config that omits a field means what it means to
//! the reference implementation.

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

/// Which dual encoder a config describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Radford et al. 2021: class-token and end-token pooling, linear
    /// projections, causal text attention, softmax contrastive loss.
    #[default]
    Clip,
    /// Zhai et al. 2023: no class token, an attention-pooling head on the
    /// image side, last-token pooling and a linear head on the text side,
    /// bidirectional text attention, a learned logit bias, sigmoid loss.
    Siglip,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Clip => "clip",
            Family::Siglip => "siglip",
        }
    }
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
    /// SigLIP: the width of the text head's output (the hidden size when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projection_size: Option<usize>,
    /// open_clip's `no_causal_mask`: a CLIP text tower that attends both
    /// ways, over the whole padded context.
    #[serde(skip_serializing_if = "is_false")]
    pub no_causal_mask: bool,
    /// open_clip's Hugging Face text tower (`hf_model_name`): XLM-RoBERTa
    /// or RoBERTa in place of CLIP's text transformer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf_tower: Option<HfTextTower>,
}

/// A BERT-style text tower as open_clip's `HFTextEncoder` runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HfTextTower {
    /// transformers' `model_type`: "xlm-roberta" or "roberta".
    pub model_type: String,
    pub pooler: TextPooler,
    pub projection: TextProjection,
    pub type_vocab_size: usize,
    /// Tokens per text (open_clip's `context_length`); the position table
    /// (`max_position_embeddings`) is longer.
    pub context_length: usize,
}

/// How open_clip pools a Hugging Face text tower's states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPooler {
    /// `mean_pooler`: the mean of the non-padding states.
    Mean,
    /// `cls_last_hidden_state_pooler`: the first token's state.
    Cls,
}

/// open_clip's `hf_proj_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextProjection {
    /// Linear, GELU, linear to the embedding, no biases.
    Mlp,
    Linear,
    /// The tower's width is the embedding's.
    None,
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
            projection_size: None,
            no_causal_mask: false,
            hf_tower: None,
        }
    }
}

impl TextConfig {
    /// `SiglipTextConfig`'s defaults.
    pub fn siglip_default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 64,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
            ..Self::default()
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
    /// SigLIP: pool with the attention head (the only pooling clipdex embeds with).
    #[serde(skip_serializing_if = "is_true")]
    pub vision_use_head: bool,
    /// open_clip's `pool_type`: the class token (CLIP's) or the mean of the
    /// patch tokens.
    #[serde(skip_serializing_if = "is_default")]
    pub pool_type: VisionPool,
    /// open_clip's `final_ln_after_pool`: the post layer norm after pooling
    /// rather than before (the same for class-token pooling).
    #[serde(skip_serializing_if = "is_false")]
    pub final_ln_after_pool: bool,
    /// open_clip's `no_ln_pre`: no layer norm before the transformer.
    #[serde(skip_serializing_if = "is_false")]
    pub no_ln_pre: bool,
    /// The paper's modified ResNet in place of the ViT (open_clip's
    /// `ModifiedResNet`); the ViT fields are then unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resnet: Option<ResNetConfig>,
}

/// How a ViT pools its tokens into one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionPool {
    /// The class token.
    #[default]
    Tok,
    /// The mean of the patch tokens.
    Avg,
}

/// Radford et al.'s modified ResNet: a stem of three 3x3 convolutions and an
/// average pool, four stages of bottleneck blocks whose strided blocks
/// downsample by average pooling, and attention pooling (a query at the mean
/// of the positions) into the embedding space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage (RN50: 3, 4, 6, 3).
    pub layers: [usize; 4],
    /// Channels of the stem; stage `i` has `width * 2^i` planes, four times
    /// that out.
    pub width: usize,
    /// Heads of the attention pooling over `width * 32` channels.
    pub heads: usize,
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
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
            vision_use_head: true,
            pool_type: VisionPool::Tok,
            final_ln_after_pool: false,
            no_ln_pre: false,
            resnet: None,
        }
    }
}

impl VisionConfig {
    /// `SiglipVisionConfig`'s defaults.
    pub fn siglip_default() -> Self {
        Self {
            patch_size: 16,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
            ..Self::default()
        }
    }

    /// Patches along one side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// CLIP's sequence length: one class token plus one token per patch.
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }
}

/// A whole dual encoder: both towers and the joint embedding space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub family: Family,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
    /// open_clip's `proj_bias`: the text projection has a bias.
    #[serde(default, skip_serializing_if = "is_false")]
    pub text_projection_bias: bool,
    /// The tokenizer the text tower was trained with, when it is not the
    /// family's own (open_clip models, and what is fine-tuned from them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerKind>,
}

/// Tokenizers other than the family's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// open_clip's `SimpleTokenizer` over CLIP's BPE.
    OpenClip,
    /// open_clip's `HFTokenizer` over a Hugging Face tokenizer (XLM-RoBERTa's).
    OpenClipHf,
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
    #[serde(default)]
    text_projection_bias: bool,
    #[serde(default)]
    tokenizer: Option<TokenizerKind>,
}

/// The `model_type`s clipdex reads, for error messages.
pub const SUPPORTED_MODEL_TYPES: &str =
    "\"clip\" (CLIPModel) and \"siglip\" (SiglipModel: SigLIP, SigLIP 2 fixed resolution)";

impl ClipConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let family = match raw.model_type.as_deref() {
            None | Some("clip") => Family::Clip,
            Some("siglip") => Family::Siglip,
            Some(kind) => {
                let hint = match kind {
                    "siglip2" => {
                        " (this is a SigLIP 2 NaFlex checkpoint; the fixed-resolution SigLIP 2 checkpoints, \
                                  such as google/siglip2-base-patch16-256, load)"
                    }
                    _ => "",
                };
                return Err(Error::Config(format!(
                    "model_type is {kind:?}{hint}; clipdex reads {SUPPORTED_MODEL_TYPES}"
                )));
            }
        };
        // transformers rebuilds the sub-config from `*_config_dict` alone when present.
        let text = raw.text_config_dict.or(raw.text_config);
        let vision = raw.vision_config_dict.or(raw.vision_config);
        let config = match family {
            Family::Clip => Self {
                family,
                text_config: sub_config(text, "text_config", TextConfig::default())?,
                vision_config: sub_config(vision, "vision_config", VisionConfig::default())?,
                projection_dim: raw.projection_dim.unwrap_or(512),
                logit_scale_init_value: raw.logit_scale_init_value.unwrap_or(2.6592),
                text_projection_bias: raw.text_projection_bias,
                tokenizer: raw.tokenizer,
            },
            Family::Siglip => {
                let text_config: TextConfig =
                    sub_config(text, "text_config", TextConfig::siglip_default())?;
                let vision_config: VisionConfig =
                    sub_config(vision, "vision_config", VisionConfig::siglip_default())?;
                Self {
                    family,
                    projection_dim: vision_config.hidden_size,
                    text_config,
                    vision_config,
                    // SigLIP initialises t' = log 10 (and the bias at -10).
                    logit_scale_init_value: 10f64.ln(),
                    text_projection_bias: false,
                    tokenizer: None,
                }
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// The width of the text tower's output: the projection (CLIP) or the head (SigLIP).
    pub fn text_output_dim(&self) -> usize {
        match self.family {
            Family::Clip => self.projection_dim,
            Family::Siglip => self
                .text_config
                .projection_size
                .unwrap_or(self.text_config.hidden_size),
        }
    }

    /// The ViT-B/32 architecture of `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        Self {
            family: Family::Clip,
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            text_projection_bias: false,
            tokenizer: None,
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
            family: Family::Clip,
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
            text_projection_bias: false,
            tokenizer: None,
        }
    }

    /// A small model that trains on a CPU: a ViT of `layers` blocks of
    /// `width` on `image` px images in `patch` px patches, a text transformer
    /// of the same size reading 32 tokens.
    pub fn small(image: usize, patch: usize, width: usize, layers: usize) -> Self {
        let heads = (width / 32).max(1);
        Self {
            family: Family::Clip,
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
            text_projection_bias: false,
            tokenizer: None,
        }
    }

    /// `small`'s text tower with the paper's modified ResNet of `width`
    /// (stages of `layers` bottlenecks) on `image` px images.
    pub fn small_resnet(
        image: usize,
        width: usize,
        layers: [usize; 4],
        text_width: usize,
        text_layers: usize,
    ) -> Self {
        let mut config = Self::small(image, 32.min(image), text_width, text_layers);
        let embed = width * 32;
        let heads = embed / 64;
        config.vision_config = VisionConfig {
            hidden_size: embed,
            intermediate_size: embed * 4,
            num_attention_heads: heads,
            image_size: image,
            patch_size: 32,
            resnet: Some(ResNetConfig {
                layers,
                width,
                heads,
            }),
            ..config.vision_config
        };
        config
    }

    /// Names of the presets, for help texts.
    pub const PRESETS: &'static [&'static str] = &[
        "tiny-32",
        "small-32",
        "small-64",
        "rn-tiny-64",
        "rn-small-64",
        "vit-b-32",
        "vit-b-16",
        "vit-l-14",
    ];

    /// Looks up a named preset.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            // About 1.1 M parameters outside the token table: for tests.
            "tiny-32" => Some(Self::small(32, 8, 64, 2)),
            // About 1.6 M / 1.6 M parameters per tower: Fashion-MNIST-sized data.
            "small-32" => Some(Self::small(32, 4, 128, 4)),
            "small-64" => Some(Self::small(64, 8, 128, 4)),
            // The paper's ResNet, one bottleneck per stage, 256-d pooling: for tests.
            "rn-tiny-64" => Some(Self::small_resnet(64, 8, [1, 1, 1, 1], 64, 2)),
            // Two per stage, 512-d pooling: Fashion-MNIST-sized data.
            "rn-small-64" => Some(Self::small_resnet(64, 16, [2, 2, 2, 2], 128, 4)),
            "vit-b-32" | "ViT-B-32" | "ViT-B/32" => Some(Self::vit_base_patch32()),
            "vit-b-16" | "ViT-B-16" | "ViT-B/16" => Some(Self::vit_base_patch16()),
            "vit-l-14" | "ViT-L-14" | "ViT-L/14" => Some(Self::vit_large_patch14()),
            _ => None,
        }
    }

    /// Writes the config in the layout transformers reads.
    pub fn to_json(&self) -> String {
        let value = match self.family {
            Family::Clip => {
                let mut value = serde_json::json!({
                    "architectures": ["CLIPModel"],
                    "model_type": "clip",
                    "projection_dim": self.projection_dim,
                    "logit_scale_init_value": self.logit_scale_init_value,
                    "text_config": with_model_type(&self.text_config, "clip_text_model"),
                    "vision_config": with_model_type(&self.vision_config, "clip_vision_model"),
                });
                if self.text_projection_bias {
                    value["text_projection_bias"] = true.into();
                }
                if let Some(kind) = self.tokenizer {
                    value["tokenizer"] =
                        serde_json::to_value(kind).expect("a tokenizer kind serialises");
                }
                value
            }
            Family::Siglip => serde_json::json!({
                "architectures": ["SiglipModel"],
                "model_type": "siglip",
                "text_config": with_model_type(&self.text_config, "siglip_text_model"),
                "vision_config": with_model_type(&self.vision_config, "siglip_vision_model"),
            }),
        };
        serde_json::to_string_pretty(&value).expect("a config always serialises")
    }

    fn validate(&self) -> Result<()> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let checks = [
            (
                t.hidden_size > 0 && t.num_attention_heads > 0,
                "text hidden_size and num_attention_heads must be positive",
            ),
            (
                t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads == 0,
                "text hidden_size must be a multiple of num_attention_heads",
            ),
            (
                v.hidden_size > 0 && v.num_attention_heads > 0,
                "vision hidden_size and num_attention_heads must be positive",
            ),
            (
                v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads == 0,
                "vision hidden_size must be a multiple of num_attention_heads",
            ),
            (
                v.patch_size > 0 && v.image_size >= v.patch_size,
                "vision patch_size must be positive and at most image_size",
            ),
            (
                v.num_channels == 3,
                "only 3-channel (RGB) vision towers are supported",
            ),
            (
                t.max_position_embeddings >= 2,
                "text max_position_embeddings must leave room for start and end tokens",
            ),
            (self.projection_dim > 0, "projection_dim must be positive"),
            (
                self.family == Family::Clip || v.vision_use_head,
                "a SigLIP vision tower without its attention-pooling head (vision_use_head: false) has no image embedding",
            ),
            (
                self.family == Family::Clip || self.text_output_dim() == v.hidden_size,
                "the SigLIP text head's width (projection_size) must equal the vision hidden_size",
            ),
        ];
        for (ok, message) in checks {
            if !ok {
                return Err(Error::Config(message.to_string()));
            }
        }
        if let Some(r) = &v.resnet {
            let embed = r.width * 32;
            if r.layers.contains(&0) || r.width == 0 || r.heads == 0 || embed % r.heads != 0 {
                return Err(Error::Config(format!(
                    "a ResNet tower needs blocks in every stage and a width whose 32-fold ({embed}) divides into                      heads ({}): got layers {:?}, width {}",
                    r.heads, r.layers, r.width
                )));
            }
            if v.image_size % 32 != 0 {
                return Err(Error::Config(format!(
                    "a ResNet tower downsamples 32-fold: image_size {} is not a multiple of 32",
                    v.image_size
                )));
            }
        }
        if self.family == Family::Siglip
            && (v.resnet.is_some() || t.no_causal_mask || self.text_projection_bias)
        {
            return Err(Error::Config(
                "open_clip's tower options apply to CLIP models only".into(),
            ));
        }
        Ok(())
    }
}

/// A sub-config: the file's fields over the family's defaults.
fn sub_config<T: for<'de> Deserialize<'de> + Serialize>(
    value: Option<serde_json::Value>,
    name: &str,
    default: T,
) -> Result<T> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Object(map)) => {
            let mut merged =
                match serde_json::to_value(default).expect("a config always serialises") {
                    serde_json::Value::Object(m) => m,
                    _ => unreachable!("configs serialise as objects"),
                };
            // transformers writes nulls for unset optional fields; they mean "default".
            merged.extend(map.into_iter().filter(|(_, v)| !v.is_null()));
            serde_json::from_value(serde_json::Value::Object(merged))
                .map_err(|e| Error::Config(format!("{name}: {e}")))
        }
        Some(other) => Err(Error::Config(format!("{name} is {other}, not an object"))),
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
            r#"{"model_type": "siglip2"}"#,
            r#"{"model_type": "siglip", "vision_config": {"vision_use_head": false}}"#,
            r#"{"model_type": "siglip", "text_config": {"projection_size": 512}}"#,
            r#"{"text_config": {"hidden_size": 30, "num_attention_heads": 4}}"#,
            r#"{"vision_config": {"hidden_act": "tanh"}}"#,
            r#"{"vision_config": {"patch_size": 0}}"#,
            r#"not json"#,
        ] {
            assert!(
                matches!(ClipConfig::from_json(text), Err(Error::Config(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn siglip_defaults_are_siglip_base_patch16_224() {
        let config = ClipConfig::from_json(
            r#"{"model_type": "siglip", "text_config": {"hidden_act": null}}"#,
        )
        .unwrap();
        assert_eq!(config.family, Family::Siglip);
        assert_eq!(config.text_config.vocab_size, 32000);
        assert_eq!(config.text_config.max_position_embeddings, 64);
        assert_eq!(config.text_config.hidden_act, Activation::GeluTanh);
        assert_eq!(config.vision_config.patch_size, 16);
        assert_eq!(config.vision_config.layer_norm_eps, 1e-6);
        assert_eq!(config.projection_dim, 768);
        assert_eq!(ClipConfig::from_json(&config.to_json()).unwrap(), config);
    }

    #[test]
    fn clip_json_is_unchanged_by_the_siglip_fields() {
        // Index fingerprints hash this text: it must not move for CLIP models.
        let json = ClipConfig::vit_base_patch32().to_json();
        assert!(
            !json.contains("projection_size")
                && !json.contains("vision_use_head")
                && !json.contains("family")
        );
    }

    #[test]
    fn round_trips_through_json() {
        let config = ClipConfig::vit_large_patch14();
        assert_eq!(ClipConfig::from_json(&config.to_json()).unwrap(), config);
    }
}
