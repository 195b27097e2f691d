//! The image tower: a ViT with patch embedding and position embeddings.
//!
//! CLIP (`CLIPVisionTransformer`) adds a class token and an extra layer norm
//! before the transformer, and pools the class token through the post layer
//! norm. SigLIP (`SiglipVisionTransformer`) has neither: its patch
//! convolution has a bias, and it pools every patch through the post layer
//! norm and a multi-head attention-pooling head (`SiglipMultiheadAttentionPoolingHead`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::Precision;
use super::config::{Family, VisionConfig, VisionPool};
use super::layers::{AttentionPool, Encoder, EncoderShape, LayerNorm, Linear, repeat_rows};
use super::{Error, Result};

#[derive(Clone, Debug)]
pub struct VisionTransformer {
    /// The patch convolution as a dense layer over flattened patches.
    patch_embedding: Linear,
    /// CLIP's class token; SigLIP has none.
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    /// CLIP's layer norm before the transformer.
    pre_layrnorm: Option<LayerNorm>,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    /// SigLIP's attention-pooling head.
    head: Option<AttentionPool>,
    /// open_clip's pooling options (CLIP pools the normalised class token).
    pool: VisionPool,
    final_ln_after_pool: bool,
    hidden: usize,
    image_size: usize,
    patch_size: usize,
}

impl VisionTransformer {
    /// Loads the weights under `vision_model.` of a Hugging Face checkpoint.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig, family: Family) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let embeddings = vb.pp("embeddings");
        let patch = embeddings
            .pp("patch_embedding")
            .get((h, cfg.num_channels, p, p), "weight")?;
        let shape = EncoderShape {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            activation: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let patch = patch.reshape((h, cfg.num_channels * p * p))?;
        let clip = family == Family::Clip;
        // One image's tokens: the rows of an interactive (batch-1) product.
        let mut encoder = Encoder::load(vb.pp("encoder"), &shape)?;
        encoder.lay_out_for(if clip {
            cfg.num_positions()
        } else {
            cfg.num_patches()
        })?;
        Ok(Self {
            patch_embedding: if clip {
                Linear::new(patch, None)?
            } else {
                Linear::new(
                    patch,
                    Some(embeddings.pp("patch_embedding").get(h, "bias")?),
                )?
            },
            class_embedding: if clip {
                Some(embeddings.get(h, "class_embedding")?)
            } else {
                None
            },
            position_embedding: embeddings.pp("position_embedding").get(
                (
                    if clip {
                        cfg.num_positions()
                    } else {
                        cfg.num_patches()
                    },
                    h,
                ),
                "weight",
            )?,
            // The misspelling is the checkpoint's key.
            pre_layrnorm: if clip && !cfg.no_ln_pre {
                Some(LayerNorm::load(
                    vb.pp("pre_layrnorm"),
                    h,
                    cfg.layer_norm_eps,
                )?)
            } else {
                None
            },
            encoder,
            post_layernorm: LayerNorm::load(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            head: if clip {
                None
            } else {
                Some(AttentionPool::load(vb.pp("head"), &shape)?)
            },
            pool: cfg.pool_type,
            final_ln_after_pool: cfg.final_ln_after_pool,
            hidden: h,
            image_size: cfg.image_size,
            patch_size: p,
        })
    }

    /// The patch embedding's, the encoder's and the pooling head's dense
    /// layers in `precision` (those of the kinds [`super::bf16::converts`]
    /// names); layer norms stay f32.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.patch_embedding
            .reduce_to(super::bf16::LayerKind::PatchEmbedding, precision)?;
        if let Some(head) = &mut self.head {
            head.reduce_to(precision)?;
        }
        self.encoder.reduce_to(precision)
    }

    /// Returns the pooled (batch, hidden) class-token states of (batch, 3, size, size) pixels.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixels.dims4()?;
        if height != self.image_size || width != self.image_size || c != 3 {
            return Err(Error::Input(format!(
                "pixel batch is {c}x{height}x{width}, the model takes 3x{s}x{s}",
                s = self.image_size
            )));
        }
        let (p, g) = (self.patch_size, self.image_size / self.patch_size);
        let h = self.hidden;
        // A stride-p convolution with a p x p kernel is a matrix product over
        // non-overlapping patches: (b*g*g, 3*p*p) x (3*p*p, hidden). Pixels past
        // the last whole patch are dropped, as the convolution drops them.
        let pixels = pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)?;
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let patches = self
            .patch_embedding
            .forward(&patches)?
            .reshape((b, g * g, h))?;
        let tokens = match &self.class_embedding {
            Some(class) if class.track_op() => {
                Tensor::cat(&[&repeat_rows(class, b)?.reshape((b, 1, h))?, &patches], 1)?
            }
            Some(class) => Tensor::cat(
                &[
                    &class.reshape((1, 1, h))?.broadcast_as((b, 1, h))?,
                    &patches,
                ],
                1,
            )?,
            None => patches,
        };
        let x = if tokens.track_op() || self.position_embedding.track_op() {
            super::ops::add_rows(&tokens, &self.position_embedding)?
        } else {
            tokens.broadcast_add(&self.position_embedding)?
        };
        let x = match &self.pre_layrnorm {
            Some(norm) => norm.forward(&x)?,
            None => x,
        };
        match (&self.head, self.pool) {
            // Layer norm is per position: normalising only the class token is exact.
            (None, VisionPool::Tok) => {
                let class = self.encoder.forward_rows(&x, None, &vec![0; b])?;
                self.post_layernorm.forward(&class)
            }
            (None, VisionPool::Avg) => {
                let x = self.encoder.forward(&x, None)?;
                let n = x.dim(1)?;
                if self.final_ln_after_pool {
                    self.post_layernorm
                        .forward(&x.narrow(1, 1, n - 1)?.mean(1)?)
                } else {
                    Ok(self
                        .post_layernorm
                        .forward(&x)?
                        .narrow(1, 1, n - 1)?
                        .mean(1)?)
                }
            }
            (Some(head), _) => {
                let x = self.encoder.forward(&x, None)?;
                head.forward(&self.post_layernorm.forward(&x)?)
            }
        }
    }
}
