//! CLIP and SigLIP in candle: config, tokenizers, preprocessing, the two
//! towers, weight loading.
//!
//! The models are Radford et al. 2021, "Learning Transferable Visual Models
//! From Natural Language Supervision" (<https://arxiv.org/abs/2103.00020>),
//! laid out as transformers' `CLIPModel` (`models/clip/modeling_clip.py`), and
//! Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"
//! (<https://arxiv.org/abs/2303.15343>), laid out as `SiglipModel`
//! (`models/siglip/modeling_siglip.py`), so that a Hugging Face checkpoint
//! maps onto the code key for key. `Family` says which; the towers share
//! their layers. Outputs match the reference to 1e-4 (see `tests/`).
//!
//! This module knows nothing of files other than checkpoints, of image
//! formats, or of indexes: it takes RGB buffers and strings.

mod amx;
pub mod bf16;
pub mod catalog;
pub mod checkpoint;
pub mod config;
mod embedder;
pub mod gemm;
pub mod init;
pub mod int8;
pub mod layers;
pub mod loss;
pub mod open_clip;
pub mod ops;
pub mod preprocess;
pub mod resnet;
pub mod roberta;
pub mod sentencepiece;
pub mod simple_tokenizer;
pub mod tensor_file;
#[cfg(test)]
pub(crate) mod test_support;
pub mod text;
mod text_clean;
mod text_tables;
pub mod tokenizer;
pub mod vision;
mod winograd;

use std::sync::{Mutex, OnceLock, PoisonError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use checkpoint::{DEFAULT_MODEL, HubOptions, ModelSource};
pub use config::{
    Activation, ClipConfig, Family, ResNetConfig, TextConfig, VisionConfig, VisionPool,
};
/// The precision a new index is made with unless told: `fast` where the CPU
/// multiplies bf16 on AMX (2.5 to 3.5 times exact's images/s there, every
/// embedding within a cosine of 0.9999 of exact's) or with AVX512-BF16
/// (1.9x exact's images/s on AMD Zen 4, queries 2x as fast) or holds bf16
/// panels for the AVX2 kernel (weights rounded alike, activations kept f32: queries 1.4
/// times as fast on Zen 2, images as fast, half the weights' memory),
/// `exact` elsewhere, where `fast` would gain nothing.
pub fn default_precision() -> Precision {
    match bf16::available() || gemm::bf16_panels() {
        true => Precision::Fast,
        false => Precision::Exact,
    }
}

pub use embedder::{Calibration, Clip, ModelInfo, Precision};
pub use preprocess::{Preprocessor, RgbView};
pub use tokenizer::{ClipTokenizer, TextTokenizer};

use layers::Linear;
use resnet::{ModifiedResNet, TrainableResNet};
use roberta::HfTextTransformer;
use tensor_file::TensorFile;
use text::TextTransformer;
use vision::VisionTransformer;

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{file} not found in {location}: {hint}")]
    MissingFile {
        file: String,
        location: String,
        hint: String,
    },
    #[error("download failed: {0}")]
    Download(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("weights do not fit the config: {0}")]
    Weights(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The image tower: a ViT (CLIP, SigLIP) or the paper's modified ResNet.
#[derive(Clone, Debug)]
enum ImageTower {
    Vit(VisionTransformer),
    /// Ends in its attention pooling's projection: no separate projection.
    ResNet(ModifiedResNet),
    /// The same with trainable weights and batch statistics.
    TrainResNet(TrainableResNet),
}

impl ImageTower {
    /// The tower's dense layers in `precision` ([`ClipModel::reduce_to`]).
    fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        match self {
            ImageTower::Vit(vit) => vit.reduce_to(precision),
            ImageTower::ResNet(resnet) => resnet.reduce_to(precision),
            ImageTower::TrainResNet(_) => Ok(()),
        }
    }
}

/// The image tower of `config` under `vb`'s top level.
fn load_image_tower(vb: &VarBuilder, config: &ClipConfig) -> Result<ImageTower> {
    let v = &config.vision_config;
    Ok(match &v.resnet {
        // Trainable weights (training) need batch statistics and gradients;
        // fixed ones fold batch normalisation away.
        Some(r)
            if vb
                .get((r.width / 2, 3, 3, 3), "vision_model.conv1.weight")?
                .track_op() =>
        {
            ImageTower::TrainResNet(TrainableResNet::load(
                vb.pp("vision_model"),
                v,
                r,
                config.projection_dim,
            )?)
        }
        Some(r) => ImageTower::ResNet(ModifiedResNet::load(
            vb.pp("vision_model"),
            v,
            r,
            config.projection_dim,
        )?),
        None => ImageTower::Vit(VisionTransformer::load(
            vb.pp("vision_model"),
            v,
            config.family,
        )?),
    })
}

/// A weight that does not fit the config, as such (not as a bare candle error).
fn weights_error(e: Error) -> Error {
    match e {
        Error::Candle(e) => Error::Weights(e.to_string()),
        other => other,
    }
}

/// When a model's image tower loads ([`Clip::load_towers`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Towers {
    /// Both towers at once, every weight checked against the config.
    #[default]
    Both,
    /// The text tower at once; the image tower when an image is first
    /// embedded, if ever. For commands that embed texts (a one-off
    /// `clipdex search`, `embed --text`): ViT-B/32's image tower is 70% of
    /// its weights, and of its loading.
    TextFirst,
}

/// The image tower, loaded, or left in the checkpoint until first used
/// ([`Towers::TextFirst`]) and then loaded once, as it would have been
/// with the rest, at the precision the model has by then.
struct LazyTower {
    tower: OnceLock<ImageTower>,
    /// What loading it needs, until it is loaded; held while one thread
    /// loads it, so that the others wait for that tower.
    pending: Mutex<Option<PendingTower>>,
}

/// An image tower yet to load: the checkpoint's weights and the precision
/// to convert them to.
#[derive(Clone)]
struct PendingTower {
    vb: VarBuilder<'static>,
    config: ClipConfig,
    precision: Precision,
}

impl LazyTower {
    fn ready(tower: ImageTower) -> Self {
        Self {
            tower: OnceLock::from(tower),
            pending: Mutex::new(None),
        }
    }

    fn pending(vb: VarBuilder<'static>, config: &ClipConfig) -> Self {
        Self {
            tower: OnceLock::new(),
            pending: Mutex::new(Some(PendingTower {
                vb,
                config: config.clone(),
                precision: Precision::Exact,
            })),
        }
    }

    /// The tower, loading it first if it is pending. A load that fails is
    /// tried again by the next call.
    fn get(&self) -> Result<&ImageTower> {
        if let Some(tower) = self.tower.get() {
            return Ok(tower);
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Another thread may have loaded it while this one waited.
        if let Some(tower) = self.tower.get() {
            return Ok(tower);
        }
        let Some(p) = pending.as_ref() else {
            return Err(Error::Weights(
                "the image tower is neither loaded nor pending".into(),
            ));
        };
        // As `Clip::load_with` loads a tower, then `ClipModel::reduce_to`.
        let mut tower = match p.precision {
            Precision::Exact => load_image_tower(&p.vb, &p.config),
            reduced => bf16::converting_on_load(reduced, || load_image_tower(&p.vb, &p.config)),
        }
        .map_err(weights_error)?;
        if p.precision != Precision::Exact {
            tower.reduce_to(p.precision)?;
        }
        *pending = None;
        Ok(self.tower.get_or_init(|| tower))
    }

    /// The tower if it is loaded.
    fn loaded(&self) -> Option<&ImageTower> {
        self.tower.get()
    }

    /// [`ImageTower::reduce_to`] now, or when it loads.
    fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        if let Some(tower) = self.tower.get_mut() {
            return tower.reduce_to(precision);
        }
        match self
            .pending
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(p) => p.precision = precision,
            None => {
                return Err(Error::Weights(
                    "the image tower is neither loaded nor pending".into(),
                ));
            }
        }
        Ok(())
    }
}

impl Clone for LazyTower {
    fn clone(&self) -> Self {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        Self {
            tower: self.tower.clone(),
            pending: Mutex::new(pending.clone()),
        }
    }
}

impl std::fmt::Debug for LazyTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tower.get() {
            Some(tower) => tower.fmt(f),
            None => f.write_str("ImageTower(pending)"),
        }
    }
}

/// The text tower: CLIP's or SigLIP's transformer, or a Hugging Face
/// encoder inside an open_clip model.
#[derive(Clone, Debug)]
enum TextTower {
    Clip(TextTransformer),
    /// Pools and projects itself.
    Hf(HfTextTransformer),
}

/// The two towers, their projections into the joint space, and the learned
/// temperature (and, for SigLIP, bias).
#[derive(Clone, Debug)]
pub struct ClipModel {
    text_model: TextTower,
    vision_model: LazyTower,
    /// CLIP's projections; SigLIP's towers end in their own heads.
    text_projection: Option<Linear>,
    visual_projection: Option<Linear>,
    logit_scale: Tensor,
    logit_bias: Option<Tensor>,
    config: ClipConfig,
}

impl ClipModel {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint's top level.
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        Self::from_file(vb, config, None)
    }

    /// [`Self::new`] for inference from the safetensors `file` that `vb`
    /// reads: the text tower's token table stays in the file
    /// ([`layers::EmbeddingTable`]).
    pub fn from_file(
        vb: VarBuilder,
        config: &ClipConfig,
        file: Option<&TensorFile>,
    ) -> Result<Self> {
        Self::with_image_tower(vb, config, file, |vb| {
            Ok(LazyTower::ready(load_image_tower(&vb, config)?))
        })
    }

    /// [`Self::from_file`] with the image tower left in the checkpoint
    /// until an image is first embedded ([`Towers::TextFirst`]).
    pub fn from_file_text_first(
        vb: VarBuilder<'static>,
        config: &ClipConfig,
        file: Option<&TensorFile>,
    ) -> Result<Self> {
        Self::with_image_tower(vb, config, file, |vb| Ok(LazyTower::pending(vb, config)))
    }

    /// The model, its image tower made by `image_tower` from `vb`.
    fn with_image_tower<'a>(
        vb: VarBuilder<'a>,
        config: &ClipConfig,
        file: Option<&TensorFile>,
        image_tower: impl FnOnce(VarBuilder<'a>) -> Result<LazyTower>,
    ) -> Result<Self> {
        let load = || -> Result<Self> {
            let (t, v) = (&config.text_config, &config.vision_config);
            let family = config.family;
            let scale_init = candle_nn::Init::Const(config.logit_scale_init_value);
            let (text_projection, visual_projection, logit_scale, logit_bias) = match family {
                Family::Clip => (
                    match t.hf_tower {
                        Some(_) => None,
                        None => Some(Linear::load(
                            vb.pp("text_projection"),
                            t.hidden_size,
                            config.projection_dim,
                            config.text_projection_bias,
                        )?),
                    },
                    match v.resnet {
                        Some(_) => None,
                        None => Some(Linear::load(
                            vb.pp("visual_projection"),
                            v.hidden_size,
                            config.projection_dim,
                            false,
                        )?),
                    },
                    vb.get_with_hints((), "logit_scale", scale_init)?,
                    None,
                ),
                // SigLIP stores both as one-element vectors.
                Family::Siglip => (
                    None,
                    None,
                    vb.get_with_hints(1, "logit_scale", scale_init)?
                        .reshape(())?,
                    Some(
                        vb.get_with_hints(1, "logit_bias", candle_nn::Init::Const(-10.0))?
                            .reshape(())?,
                    ),
                ),
            };
            Ok(Self {
                text_model: match &t.hf_tower {
                    Some(hf) => TextTower::Hf(HfTextTransformer::load(
                        vb.clone(),
                        t,
                        hf,
                        config.projection_dim,
                        file,
                    )?),
                    None => TextTower::Clip(TextTransformer::load(
                        vb.pp("text_model"),
                        t,
                        family,
                        file,
                    )?),
                },
                vision_model: image_tower(vb)?,
                text_projection,
                visual_projection,
                logit_scale,
                logit_bias,
                config: config.clone(),
            })
        };
        load().map_err(weights_error)
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Projected, unnormalised text features (`get_text_features`).
    ///
    /// `ids` is (batch, seq) u32; `pool` the end-of-text position of each row.
    pub fn get_text_features(&self, ids: &Tensor, pool: &[usize]) -> Result<Tensor> {
        let pooled = match &self.text_model {
            TextTower::Clip(tower) => tower.forward(ids, pool)?,
            TextTower::Hf(tower) => tower.forward(ids)?,
        };
        self.project_text(&pooled)
    }

    /// The text projection, where the tower does not project itself.
    fn project_text(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.text_projection {
            Some(projection) => projection.forward(pooled),
            None => Ok(pooled.clone()),
        }
    }

    /// Whether texts that begin alike can go through the text tower with
    /// their beginning computed once ([`Self::get_text_features_after`]).
    pub fn shares_text_beginnings(&self) -> bool {
        match &self.text_model {
            TextTower::Clip(tower) => tower.shares_beginnings(),
            TextTower::Hf(_) => false,
        }
    }

    /// [`Self::get_text_features`] of texts that all begin with the tokens
    /// `first` ([`TextTransformer::forward_after`]): `own[i]` is text `i`'s
    /// tokens after `first`, unpadded; `pool` counts from the start.
    pub fn get_text_features_after(
        &self,
        first: &[u32],
        own: &[&[u32]],
        pool: &[usize],
    ) -> Result<Tensor> {
        let pooled = match &self.text_model {
            TextTower::Clip(tower) => tower.forward_after(first, own, pool)?,
            TextTower::Hf(_) => {
                return Err(Error::Input(
                    "this text tower attends both ways: texts cannot share a beginning".into(),
                ));
            }
        };
        self.project_text(&pooled)
    }

    /// Projected, unnormalised image features (`get_image_features`) of (batch, 3, s, s) pixels.
    pub fn get_image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = match self.vision_model.get()? {
            ImageTower::Vit(vit) => vit.forward(pixels)?,
            ImageTower::ResNet(resnet) => resnet.forward(pixels)?,
            ImageTower::TrainResNet(resnet) => resnet.forward(pixels)?,
        };
        match &self.visual_projection {
            Some(projection) => projection.forward(&pooled),
            None => Ok(pooled),
        }
    }

    /// The towers' dense layers in `precision` (`fast`: bf16, `int8`), those
    /// of the kinds [`bf16::converts`] names: by default the encoder layers, the
    /// ViT's patch embedding, the ResNet's stage convolutions and the keys
    /// and values of the attention-pooling heads (SigLIP's, the ResNet's);
    /// the stem, layer norms, attention's softmax, the heads' one-row
    /// products and the final projections stay f32. Trainable towers are
    /// left as they are.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        match &mut self.text_model {
            TextTower::Clip(tower) => tower.reduce_to(precision)?,
            TextTower::Hf(tower) => tower.reduce_to(precision)?,
        }
        for projection in [&mut self.text_projection, &mut self.visual_projection]
            .into_iter()
            .flatten()
        {
            projection.reduce_to(bf16::LayerKind::Projection, precision)?;
        }
        self.vision_model.reduce_to(precision)
    }

    /// Training mode: batch normalisation (the ResNet's, when trainable)
    /// uses the batch's statistics and updates its running ones; otherwise
    /// the running ones. Other layers behave the same either way.
    pub fn set_training(&self, training: bool) {
        if let Some(ImageTower::TrainResNet(resnet)) = self.vision_model.loaded() {
            resnet.set_training(training);
        }
    }

    /// State that is not a weight but is saved with them: batch
    /// normalisation's running statistics, by checkpoint name.
    pub fn buffers(&self) -> Vec<(String, candle_core::Var)> {
        match self.vision_model.loaded() {
            Some(ImageTower::TrainResNet(resnet)) => resnet.buffers(),
            _ => Vec::new(),
        }
    }

    /// The learned log-temperature `t`; logits are scaled by `exp(t)`.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// SigLIP's learned bias `b`; logits are `exp(t) * cos + b`.
    pub fn logit_bias(&self) -> Option<&Tensor> {
        self.logit_bias.as_ref()
    }

    /// (images, texts) logits from unnormalised features: `exp(t) * cos`,
    /// plus `b` for SigLIP.
    pub fn logits_per_image(
        &self,
        image_features: &Tensor,
        text_features: &Tensor,
    ) -> Result<Tensor> {
        let i = normalize(image_features)?;
        let t = normalize(text_features)?;
        let cos = i.matmul(&t.t()?)?;
        let logits = cos.broadcast_mul(&self.logit_scale.exp()?)?;
        match &self.logit_bias {
            Some(bias) => Ok(logits.broadcast_add(bias)?),
            None => Ok(logits),
        }
    }
}

/// L2-normalises the rows of a (batch, dim) tensor.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)?)
}

/// Opens a weights file as a `VarBuilder` producing f32 tensors on `device`.
pub fn load_weights(
    weights: &checkpoint::WeightsFile,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match weights {
        checkpoint::WeightsFile::Safetensors(path) => Ok(VarBuilder::from_backend(
            Box::new(TensorFile::open(path)?),
            DType::F32,
            device.clone(),
        )),
        checkpoint::WeightsFile::Pickle(path) => VarBuilder::from_pth(path, DType::F32, device)
            .map_err(|e| Error::Weights(format!("{}: {e}", path.display()))),
    }
}
