//! open_clip checkpoints: `open_clip_config.json` with `open_clip_model.safetensors`
//! (or `open_clip_pytorch_model.bin`), as open_clip 2.x/3.x publishes them on the
//! hub (`timm/resnet50_clip.openai`, `laion/CLIP-ViT-*`, ...).
//!
//! The config is open_clip's `model_cfg` (`CLIPVisionCfg`, `CLIPTextCfg`,
//! `quick_gelu`, `embed_dim`) and `preprocess_cfg`. It becomes a
//! [`ClipConfig`]: a ViT or the paper's modified ResNet, open_clip's
//! text transformer, and open_clip's options that change the result (pooling,
//! layer norms, causal mask, projection bias). Options open_clip offers that
//! clipdex does not run (timm and Hugging Face towers, layer scale, custom
//! attention blocks, attentional poolers) are refused by name, never ignored.
//!
//! The weights are renamed onto the Hugging Face layout the towers read
//! (`visual.transformer.resblocks.3.attn.in_proj_weight` ->
//! `vision_model.encoder.layers.3.self_attn.{q,k,v}_proj.weight`, and so on);
//! a ResNet keeps open_clip's names under `vision_model.`. A weight that no
//! rule places is an error: a variant this code does not know must not load
//! half-read.

use std::collections::HashMap;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::Value;

use super::config::{
    Activation, ClipConfig, Family, HfTextTower, ResNetConfig, TextConfig, TextPooler,
    TextProjection, TokenizerKind, VisionConfig, VisionPool,
};
use super::preprocess::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocessor, Resample};
use super::{Error, Result};

/// What `open_clip_config.json` holds.
#[derive(Clone, Debug)]
pub struct OpenClipConfig {
    pub config: ClipConfig,
    pub preprocess: Preprocessor,
    /// `preprocess_cfg` as written (part of the model's fingerprint).
    pub preprocess_text: String,
}

#[derive(Deserialize)]
struct RawFile {
    model_cfg: serde_json::Map<String, Value>,
    #[serde(default)]
    preprocess_cfg: Option<serde_json::Map<String, Value>>,
}

/// Reads one field of a config dict, with open_clip's default.
struct Fields<'a> {
    name: &'static str,
    map: &'a serde_json::Map<String, Value>,
}

impl Fields<'_> {
    fn get<T: for<'de> Deserialize<'de>>(&self, key: &str, default: T) -> Result<T> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::Config(format!("open_clip {}.{key}: {e}", self.name))),
        }
    }

    /// Refuses an option unless it has its default (null, false, empty).
    fn refuse_set(&self, key: &str, what: &str) -> Result<()> {
        let set = match self.map.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::String(s)) => !s.is_empty() && s != "default",
            Some(_) => true,
        };
        if set {
            return Err(Error::Config(format!(
                "open_clip {}.{key} is set ({what}); clipdex runs open_clip's standard ViT, ModifiedResNet and \
                 text transformer",
                self.name
            )));
        }
        Ok(())
    }

    /// Fails on keys open_clip's dataclass does not have (open_clip fails too).
    fn only(&self, known: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(Error::Config(format!(
                "open_clip {} has an unknown field {k:?}",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// `norm_kwargs`: only `eps` changes a layer norm.
    fn norm_eps(&self) -> Result<f64> {
        let kwargs: Option<HashMap<String, Value>> = self.get("norm_kwargs", None)?;
        let kwargs = kwargs.unwrap_or_default();
        if let Some(k) = kwargs.keys().find(|k| k.as_str() != "eps") {
            return Err(Error::Config(format!(
                "open_clip {}.norm_kwargs.{k} is not supported",
                self.name
            )));
        }
        match kwargs.get("eps") {
            None => Ok(1e-5),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::Config(format!("open_clip {}.norm_kwargs.eps: {v}", self.name))
            }),
        }
    }
}

const BLOCK_OPTIONS: [(&str, &str); 7] = [
    ("block_type", "custom attention blocks"),
    ("qk_norm", "layer-normalised q and k"),
    ("scaled_cosine_attn", "scaled cosine attention"),
    ("scale_heads", "per-head scales"),
    ("scale_attn_inner", "inner attention norm"),
    ("scale_attn", "post-attention norm"),
    ("scale_fc", "MLP norm"),
];

const VISION_FIELDS: &[&str] = &[
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "ls_init_value",
    "patch_dropout",
    "attentional_pool",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "no_ln_pre",
    "pos_embed_type",
    "final_ln_after_pool",
    "pool_type",
    "output_tokens",
    "act_kwargs",
    "norm_kwargs",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "timm_model_name",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
];

const TEXT_FIELDS: &[&str] = &[
    "context_length",
    "vocab_size",
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "ls_init_value",
    "embed_cls",
    "pad_id",
    "eos_id",
    "no_causal_mask",
    "final_ln_after_pool",
    "pool_type",
    "proj_bias",
    "proj_type",
    "output_tokens",
    "act_kwargs",
    "norm_kwargs",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "hf_model_name",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
    "proj",
    "pooler_type",
];

impl OpenClipConfig {
    /// Parses the text of an `open_clip_config.json`.
    /// Parses the text of an `open_clip_config.json`; `hf_text_config` is
    /// the `config.json` of the Hugging Face text model it names, if any.
    pub fn from_json(text: &str, hf_text_config: Option<&str>) -> Result<Self> {
        let raw: RawFile = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("open_clip_config.json: {e}")))?;
        let top = Fields {
            name: "model_cfg",
            map: &raw.model_cfg,
        };
        top.only(&[
            "embed_dim",
            "vision_cfg",
            "text_cfg",
            "quick_gelu",
            "custom_text",
            "init_logit_scale",
            "init_logit_bias",
            "nonscalar_logit_scale",
            "cast_dtype",
            "output_dict",
        ])?;
        top.refuse_set(
            "init_logit_bias",
            "a sigmoid-loss model: load its Hugging Face SigLIP layout (config.json, model_type \"siglip\")",
        )?;
        let embed_dim: usize = top.get("embed_dim", 0)?;
        if embed_dim == 0 {
            return Err(Error::Config("open_clip model_cfg has no embed_dim".into()));
        }
        let activation = if top.get("quick_gelu", false)? {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let section = |key: &str| -> Result<serde_json::Map<String, Value>> {
            match raw.model_cfg.get(key) {
                Some(Value::Object(m)) => Ok(m.clone()),
                None | Some(Value::Null) => Ok(Default::default()),
                Some(other) => Err(Error::Config(format!(
                    "open_clip model_cfg.{key} is {other}, not a dict"
                ))),
            }
        };
        let vision_map = section("vision_cfg")?;
        let text_map = section("text_cfg")?;
        let vision_config = vision_tower(
            &Fields {
                name: "vision_cfg",
                map: &vision_map,
            },
            activation,
        )?;
        let text_fields = Fields {
            name: "text_cfg",
            map: &text_map,
        };
        let (text_config, text_projection_bias) =
            match text_fields.get::<Option<String>>("hf_model_name", None)? {
                Some(name) => {
                    let hf = hf_text_config.ok_or_else(|| {
                        Error::Config(format!(
                            "the open_clip text tower is {name}, whose config.json was not found"
                        ))
                    })?;
                    (hf_text_tower(&text_fields, &name, hf, embed_dim)?, false)
                }
                None => text_tower(&text_fields, activation)?,
            };
        let config = ClipConfig {
            family: Family::Clip,
            vision_config,
            projection_dim: embed_dim,
            logit_scale_init_value: top.get("init_logit_scale", (1.0f64 / 0.07).ln())?,
            tokenizer: Some(match text_config.hf_tower {
                Some(_) => TokenizerKind::OpenClipHf,
                None => TokenizerKind::OpenClip,
            }),
            text_config,
            text_projection_bias,
        };
        let config = ClipConfig::from_json(&config.to_json())?;
        let pre = raw.preprocess_cfg.unwrap_or_default();
        let preprocess = preprocess(
            &Fields {
                name: "preprocess_cfg",
                map: &pre,
            },
            config.vision_config.image_size,
        )?;
        Ok(Self {
            config,
            preprocess,
            preprocess_text: Value::Object(pre).to_string(),
        })
    }
}

/// `CLIPVisionCfg`: a ViT, or a ModifiedResNet when `layers` is four numbers.
fn vision_tower(f: &Fields, activation: Activation) -> Result<VisionConfig> {
    f.only(VISION_FIELDS)?;
    f.refuse_set("timm_model_name", "a timm image tower")?;
    f.refuse_set("ls_init_value", "layer scale")?;
    f.refuse_set("attentional_pool", "an attentional pooler")?;
    f.refuse_set("act_kwargs", "activation arguments")?;
    for (key, what) in BLOCK_OPTIONS {
        f.refuse_set(key, what)?;
    }
    let image_size = match f.get::<Value>("image_size", Value::from(224))? {
        Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
        Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64().unwrap_or(0) as usize,
        other => {
            return Err(Error::Config(format!(
                "open_clip vision_cfg.image_size {other}: only square images are supported"
            )));
        }
    };
    let width: usize = f.get("width", 768)?;
    let head_width: usize = f.get("head_width", 64)?;
    if head_width == 0 {
        return Err(Error::Config("open_clip vision_cfg.head_width is 0".into()));
    }
    let eps = f.norm_eps()?;
    match f.get::<Value>("layers", Value::from(12))? {
        Value::Array(layers) => {
            let layers: Vec<usize> = layers
                .iter()
                .map(|v| v.as_u64().unwrap_or(0) as usize)
                .collect();
            let layers: [usize; 4] = layers.try_into().map_err(|l| {
                Error::Config(format!(
                    "open_clip vision_cfg.layers {l:?}: a ResNet has four stages"
                ))
            })?;
            let heads = width * 32 / head_width;
            Ok(VisionConfig {
                hidden_size: width * 32,
                num_attention_heads: heads.max(1),
                intermediate_size: width * 32 * 4,
                image_size,
                patch_size: 32,
                hidden_act: activation,
                layer_norm_eps: eps,
                resnet: Some(ResNetConfig {
                    layers,
                    width,
                    heads,
                }),
                ..VisionConfig::default()
            })
        }
        Value::Number(n) => {
            if f.get::<String>("pos_embed_type", "learnable".into())? != "learnable" {
                return Err(Error::Config(
                    "open_clip vision_cfg.pos_embed_type: only learnable position embeddings are supported".into(),
                ));
            }
            let pool_type = match f.get::<String>("pool_type", "tok".into())?.as_str() {
                "tok" => VisionPool::Tok,
                "avg" => VisionPool::Avg,
                other => {
                    return Err(Error::Config(format!(
                        "open_clip vision_cfg.pool_type {other:?}: clipdex pools \"tok\" or \"avg\""
                    )));
                }
            };
            let mlp_ratio: f64 = f.get("mlp_ratio", 4.0)?;
            Ok(VisionConfig {
                hidden_size: width,
                intermediate_size: (width as f64 * mlp_ratio) as usize,
                num_hidden_layers: n.as_u64().unwrap_or(0) as usize,
                num_attention_heads: width / head_width,
                image_size,
                patch_size: f.get("patch_size", 16)?,
                hidden_act: activation,
                layer_norm_eps: eps,
                pool_type,
                final_ln_after_pool: f.get("final_ln_after_pool", false)?,
                no_ln_pre: f.get("no_ln_pre", false)?,
                ..VisionConfig::default()
            })
        }
        other => Err(Error::Config(format!(
            "open_clip vision_cfg.layers is {other}"
        ))),
    }
}

/// `CLIPTextCfg`: open_clip's text transformer (and whether its projection has a bias).
fn text_tower(f: &Fields, activation: Activation) -> Result<(TextConfig, bool)> {
    f.only(TEXT_FIELDS)?;
    f.refuse_set("ls_init_value", "layer scale")?;
    f.refuse_set("embed_cls", "a CoCa class token")?;
    f.refuse_set("act_kwargs", "activation arguments")?;
    f.refuse_set("tokenizer_mode", "another tokenizer")?;
    for (key, what) in BLOCK_OPTIONS {
        f.refuse_set(key, what)?;
    }
    let tokenizer_kwargs: HashMap<String, Value> = f.get("tokenizer_kwargs", HashMap::new())?;
    for (k, v) in &tokenizer_kwargs {
        if !(k == "clean" && v == "lower") {
            return Err(Error::Config(format!(
                "open_clip text_cfg.tokenizer_kwargs {k}={v}: clipdex runs the default tokenizer (clean \"lower\")"
            )));
        }
    }
    // argmax pools the end token (the largest id); eos pools the first end token: the same position.
    match f.get::<String>("pool_type", "argmax".into())?.as_str() {
        "argmax" => {}
        "eos" if f.get::<u32>("eos_id", 2)? == 49407 => {}
        other => {
            return Err(Error::Config(format!(
                "open_clip text_cfg.pool_type {other:?}: clipdex pools at the end token (\"argmax\")"
            )));
        }
    }
    if f.get::<String>("proj_type", "linear".into())? != "linear" {
        return Err(Error::Config(
            "open_clip text_cfg.proj_type: only \"linear\" is supported".into(),
        ));
    }
    if f.get::<u32>("pad_id", 0)? != 0 {
        return Err(Error::Config(
            "open_clip text_cfg.pad_id: only 0 is supported".into(),
        ));
    }
    let width: usize = f.get("width", 512)?;
    let mlp_ratio: f64 = f.get("mlp_ratio", 4.0)?;
    let config = TextConfig {
        vocab_size: f.get("vocab_size", 49408)?,
        hidden_size: width,
        intermediate_size: (width as f64 * mlp_ratio) as usize,
        num_hidden_layers: f.get("layers", 12)?,
        num_attention_heads: f.get("heads", 8)?,
        max_position_embeddings: f.get("context_length", 77)?,
        hidden_act: activation,
        layer_norm_eps: f.norm_eps()?,
        pad_token_id: Some(0),
        bos_token_id: Some(49406),
        eos_token_id: Some(49407),
        projection_size: None,
        no_causal_mask: f.get("no_causal_mask", false)?,
        hf_tower: None,
    };
    Ok((config, f.get("proj_bias", false)?))
}

/// open_clip's `HFTextEncoder`: `hf_model_name`'s architecture (from its
/// `config.json`), open_clip's pooling and projection.
fn hf_text_tower(f: &Fields, name: &str, hf_config: &str, embed_dim: usize) -> Result<TextConfig> {
    f.only(TEXT_FIELDS)?;
    let raw: serde_json::Map<String, Value> = serde_json::from_str(hf_config)
        .map_err(|e| Error::Config(format!("config.json of {name}: {e}")))?;
    let hf = Fields {
        name: "config.json of the text model",
        map: &raw,
    };
    let model_type: String = hf.get("model_type", String::new())?;
    if model_type != "xlm-roberta" && model_type != "roberta" {
        return Err(Error::Config(format!(
            "the open_clip text tower {name} is a {model_type:?} model; clipdex runs XLM-RoBERTa and RoBERTa towers"
        )));
    }
    if hf.get::<String>("position_embedding_type", "absolute".into())? != "absolute"
        || hf.get("is_decoder", false)?
        || hf.get("add_cross_attention", false)?
    {
        return Err(Error::Config(format!(
            "{name}: only encoders with absolute position embeddings are supported"
        )));
    }
    let hidden_act = match hf.get::<String>("hidden_act", "gelu".into())?.as_str() {
        "gelu" => Activation::Gelu,
        other => {
            return Err(Error::Config(format!(
                "{name}: hidden_act {other:?} is not supported"
            )));
        }
    };
    let pooler = match f
        .get::<String>("hf_pooler_type", "mean_pooler".into())?
        .as_str()
    {
        "mean_pooler" => TextPooler::Mean,
        "cls_last_hidden_state_pooler" => TextPooler::Cls,
        other => {
            return Err(Error::Config(format!(
                "open_clip text_cfg.hf_pooler_type {other:?}: clipdex pools \"mean_pooler\" or \"cls_last_hidden_state_pooler\""
            )));
        }
    };
    let hidden: usize = hf.get("hidden_size", 768)?;
    let projection = match f
        .get::<Option<String>>("hf_proj_type", Some("mlp".into()))?
        .as_deref()
    {
        Some("mlp") => TextProjection::Mlp,
        Some("linear") => TextProjection::Linear,
        None if hidden == embed_dim => TextProjection::None,
        other => {
            return Err(Error::Config(format!(
                "open_clip text_cfg.hf_proj_type {other:?} (text width {hidden}, embedding {embed_dim})"
            )));
        }
    };
    let tokenizer_kwargs: HashMap<String, Value> = f.get("tokenizer_kwargs", HashMap::new())?;
    if let Some((k, v)) = tokenizer_kwargs
        .iter()
        .find(|(k, v)| !(k.as_str() == "clean" && *v == "whitespace"))
    {
        return Err(Error::Config(format!(
            "open_clip text_cfg.tokenizer_kwargs {k}={v}: clipdex runs HFTokenizer's default (clean \"whitespace\")"
        )));
    }
    f.refuse_set("tokenizer_mode", "another tokenizer")?;
    Ok(TextConfig {
        vocab_size: hf.get("vocab_size", 30522)?,
        hidden_size: hidden,
        intermediate_size: hf.get("intermediate_size", 3072)?,
        num_hidden_layers: hf.get("num_hidden_layers", 12)?,
        num_attention_heads: hf.get("num_attention_heads", 12)?,
        max_position_embeddings: hf.get("max_position_embeddings", 512)?,
        hidden_act,
        layer_norm_eps: hf.get("layer_norm_eps", 1e-12)?,
        pad_token_id: Some(hf.get("pad_token_id", 1)?),
        bos_token_id: Some(hf.get("bos_token_id", 0)?),
        eos_token_id: Some(hf.get("eos_token_id", 2)?),
        projection_size: None,
        no_causal_mask: false,
        hf_tower: Some(HfTextTower {
            model_type,
            pooler,
            projection,
            type_vocab_size: hf.get("type_vocab_size", 2)?,
            context_length: f.get("context_length", 77)?,
        }),
    })
}

/// `preprocess_cfg`: mean, std, interpolation, resize mode (open_clip's
/// `PreprocessCfg` defaults: OpenAI's mean and std, bicubic, shortest side).
fn preprocess(f: &Fields, image_size: usize) -> Result<Preprocessor> {
    f.only(&[
        "size",
        "mode",
        "mean",
        "std",
        "interpolation",
        "resize_mode",
        "fill_color",
    ])?;
    if f.get::<String>("mode", "RGB".into())? != "RGB" {
        return Err(Error::Config(
            "open_clip preprocess_cfg.mode: only RGB is supported".into(),
        ));
    }
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        match f.get::<Option<Vec<f32>>>(key, None)? {
            None => Ok(default),
            Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
            Some(v) if v.len() == 1 => Ok([v[0]; 3]),
            Some(v) => Err(Error::Config(format!(
                "open_clip preprocess_cfg.{key} has {} values",
                v.len()
            ))),
        }
    };
    let resample = match f.get::<String>("interpolation", "bicubic".into())?.as_str() {
        "bicubic" => Resample::Bicubic,
        "bilinear" => Resample::Bilinear,
        "nearest" => Resample::Nearest,
        other => {
            return Err(Error::Config(format!(
                "open_clip preprocess_cfg.interpolation {other:?}"
            )));
        }
    };
    let squash = match f.get::<String>("resize_mode", "shortest".into())?.as_str() {
        "shortest" => false,
        "squash" => true,
        other => {
            return Err(Error::Config(format!(
                "open_clip preprocess_cfg.resize_mode {other:?}: clipdex resizes \"shortest\" (and crops) or \"squash\""
            )));
        }
    };
    let std = triple("std", OPENAI_CLIP_STD)?;
    if std.contains(&0.0) {
        return Err(Error::Config(
            "open_clip preprocess_cfg.std has a zero".into(),
        ));
    }
    Ok(Preprocessor::torchvision(
        image_size,
        squash,
        resample,
        triple("mean", OPENAI_CLIP_MEAN)?,
        std,
    ))
}

/// Renames open_clip's weights onto the names the towers load.
pub fn remap(
    weights: HashMap<String, Tensor>,
    config: &ClipConfig,
) -> Result<HashMap<String, Tensor>> {
    remap_leaving(weights, config, &[])
}

/// open_clip's names of the text tower's token or word table, with the
/// names `remap` gives them: the tables an inference model leaves in the
/// file ([`super::layers::EmbeddingTable`]).
pub const TEXT_TABLES: [(&str, &str); 3] = [
    (
        "token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
    ),
    (
        "text.token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
    ),
    (
        "text.transformer.embeddings.word_embeddings.weight",
        "text_model.embeddings.word_embeddings.weight",
    ),
];

/// [`remap`] of a checkpoint read without the tensors `left` (open_clip
/// names, kept in the file): they are neither missing nor in the result.
pub fn remap_leaving(
    mut weights: HashMap<String, Tensor>,
    config: &ClipConfig,
    left: &[&str],
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(weights.len() + 64);
    // Buffers that are not weights.
    weights.retain(|k, _| {
        !k.ends_with("num_batches_tracked") && k != "attn_mask" && !k.ends_with(".attn_mask")
    });
    let mut pending: Vec<(String, String, Transform)> = Vec::new();
    pending.push((
        "logit_scale".into(),
        "logit_scale".into(),
        Transform::Scalar,
    ));
    let text_prefix = if weights.contains_key("text.token_embedding.weight")
        || left.contains(&"text.token_embedding.weight")
    {
        "text."
    } else {
        ""
    };
    let t = text_prefix;
    match &config.text_config.hf_tower {
        Some(hf) => {
            hf_text_weights(&mut pending, hf, config.text_config.num_hidden_layers);
            weights.retain(|k, _| {
                !k.ends_with("embeddings.position_ids") && !k.ends_with("embeddings.token_type_ids")
            });
        }
        None => clip_text_weights(&mut pending, t, config),
    }
    let v = &config.vision_config;
    match &v.resnet {
        Some(_) => {
            let keys: Vec<String> = weights
                .keys()
                .filter(|k| k.starts_with("visual."))
                .cloned()
                .collect();
            for k in keys {
                let to = format!("vision_model.{}", &k["visual.".len()..]);
                pending.push((k, to, Transform::Same));
            }
        }
        None => {
            let e = "vision_model.embeddings";
            pending.push((
                "visual.class_embedding".into(),
                format!("{e}.class_embedding"),
                Transform::Same,
            ));
            pending.push((
                "visual.positional_embedding".into(),
                format!("{e}.position_embedding.weight"),
                Transform::Same,
            ));
            pending.push((
                "visual.conv1.weight".into(),
                format!("{e}.patch_embedding.weight"),
                Transform::Same,
            ));
            if !v.no_ln_pre {
                for p in ["weight", "bias"] {
                    pending.push((
                        format!("visual.ln_pre.{p}"),
                        format!("vision_model.pre_layrnorm.{p}"),
                        Transform::Same,
                    ));
                }
            }
            for p in ["weight", "bias"] {
                pending.push((
                    format!("visual.ln_post.{p}"),
                    format!("vision_model.post_layernorm.{p}"),
                    Transform::Same,
                ));
            }
            pending.push((
                "visual.proj".into(),
                "visual_projection.weight".into(),
                Transform::Transpose,
            ));
            blocks(
                &mut pending,
                "visual.transformer.resblocks",
                "vision_model.encoder.layers",
                v.num_hidden_layers,
            );
        }
    }
    for (from, to, transform) in pending {
        if left.contains(&from.as_str()) {
            continue;
        }
        let tensor = weights
            .remove(&from)
            .ok_or_else(|| Error::Weights(format!("the open_clip checkpoint has no {from}")))?;
        match transform {
            Transform::Same => {
                out.insert(to, tensor);
            }
            Transform::Transpose => {
                out.insert(to, tensor.t()?.contiguous()?);
            }
            Transform::Scalar => {
                out.insert(to, tensor.flatten_all()?.get(0)?);
            }
            Transform::SplitQkv => {
                // (3 * h, ...) packed as q, k, v.
                let h = tensor.dim(0)? / 3;
                for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(
                        to.replace("{qkv}", name),
                        tensor.narrow(0, i * h, h)?.contiguous()?,
                    );
                }
            }
        }
    }
    if !weights.is_empty() {
        let mut left: Vec<&String> = weights.keys().collect();
        left.sort();
        let shown: Vec<&str> = left.iter().take(5).map(|s| s.as_str()).collect();
        return Err(Error::Weights(format!(
            "the open_clip checkpoint has {} weights its config does not explain ({}{}): a variant clipdex does not run",
            left.len(),
            shown.join(", "),
            if left.len() > 5 { ", ..." } else { "" }
        )));
    }
    Ok(out)
}

/// open_clip's text transformer onto `CLIPTextTransformer` names; `t` is
/// the prefix (`text.` in `CustomTextCLIP`s, none in `CLIP`s).
fn clip_text_weights(pending: &mut Vec<(String, String, Transform)>, t: &str, config: &ClipConfig) {
    pending.push((
        format!("{t}token_embedding.weight"),
        "text_model.embeddings.token_embedding.weight".into(),
        Transform::Same,
    ));
    pending.push((
        format!("{t}positional_embedding"),
        "text_model.embeddings.position_embedding.weight".into(),
        Transform::Same,
    ));
    pending.push((
        format!("{t}ln_final.weight"),
        "text_model.final_layer_norm.weight".into(),
        Transform::Same,
    ));
    pending.push((
        format!("{t}ln_final.bias"),
        "text_model.final_layer_norm.bias".into(),
        Transform::Same,
    ));
    if config.text_projection_bias {
        pending.push((
            format!("{t}text_projection.weight"),
            "text_projection.weight".into(),
            Transform::Same,
        ));
        pending.push((
            format!("{t}text_projection.bias"),
            "text_projection.bias".into(),
            Transform::Same,
        ));
    } else {
        pending.push((
            format!("{t}text_projection"),
            "text_projection.weight".into(),
            Transform::Transpose,
        ));
    }
    blocks(
        pending,
        &format!("{t}transformer.resblocks"),
        "text_model.encoder.layers",
        config.text_config.num_hidden_layers,
    );
}

/// open_clip's `HFTextEncoder` (`text.transformer`, `text.proj`) onto the
/// names `roberta::HfTextTransformer` loads.
fn hf_text_weights(
    pending: &mut Vec<(String, String, Transform)>,
    hf: &HfTextTower,
    layers: usize,
) {
    let (f, t) = ("text.transformer", "text_model");
    for name in [
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "LayerNorm.weight",
        "LayerNorm.bias",
    ] {
        pending.push((
            format!("{f}.embeddings.{name}"),
            format!("{t}.embeddings.{name}"),
            Transform::Same,
        ));
    }
    for i in 0..layers {
        let (from, to) = (
            format!("{f}.encoder.layer.{i}"),
            format!("{t}.encoder.layers.{i}"),
        );
        for p in ["weight", "bias"] {
            for (a, b) in [
                ("attention.self.query", "self_attn.q_proj"),
                ("attention.self.key", "self_attn.k_proj"),
                ("attention.self.value", "self_attn.v_proj"),
                ("attention.output.dense", "self_attn.out_proj"),
                ("attention.output.LayerNorm", "layer_norm1"),
                ("intermediate.dense", "mlp.fc1"),
                ("output.dense", "mlp.fc2"),
                ("output.LayerNorm", "layer_norm2"),
            ] {
                pending.push((
                    format!("{from}.{a}.{p}"),
                    format!("{to}.{b}.{p}"),
                    Transform::Same,
                ));
            }
        }
    }
    match hf.projection {
        TextProjection::None => {}
        TextProjection::Linear => pending.push((
            "text.proj.weight".into(),
            "text_projection.weight".into(),
            Transform::Same,
        )),
        TextProjection::Mlp => {
            for i in ["0", "2"] {
                pending.push((
                    format!("text.proj.{i}.weight"),
                    format!("text_projection.{i}.weight"),
                    Transform::Same,
                ));
            }
        }
    }
}

enum Transform {
    Same,
    /// open_clip stores projections as (in, out) matrices used as `x @ p`.
    Transpose,
    /// `logit_scale` of shape [] or [1].
    Scalar,
    /// `nn.MultiheadAttention`'s packed q, k, v; `{qkv}` in the target name.
    SplitQkv,
}

/// One `ResidualAttentionBlock` per layer onto `CLIPEncoderLayer` names.
fn blocks(pending: &mut Vec<(String, String, Transform)>, from: &str, to: &str, layers: usize) {
    for i in 0..layers {
        let (f, t) = (format!("{from}.{i}"), format!("{to}.{i}"));
        for p in ["weight", "bias"] {
            pending.push((
                format!("{f}.ln_1.{p}"),
                format!("{t}.layer_norm1.{p}"),
                Transform::Same,
            ));
            pending.push((
                format!("{f}.ln_2.{p}"),
                format!("{t}.layer_norm2.{p}"),
                Transform::Same,
            ));
            pending.push((
                format!("{f}.attn.out_proj.{p}"),
                format!("{t}.self_attn.out_proj.{p}"),
                Transform::Same,
            ));
            pending.push((
                format!("{f}.mlp.c_fc.{p}"),
                format!("{t}.mlp.fc1.{p}"),
                Transform::Same,
            ));
            pending.push((
                format!("{f}.mlp.c_proj.{p}"),
                format!("{t}.mlp.fc2.{p}"),
                Transform::Same,
            ));
        }
        pending.push((
            format!("{f}.attn.in_proj_weight"),
            format!("{t}.self_attn.{{qkv}}.weight"),
            Transform::SplitQkv,
        ));
        pending.push((
            format!("{f}.attn.in_proj_bias"),
            format!("{t}.self_attn.{{qkv}}.bias"),
            Transform::SplitQkv,
        ));
    }
}
