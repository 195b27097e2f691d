//! The image tower (`CLIPVisionTransformer`): a ViT with patch embedding,
//! class token, position embeddings, the extra layer norm before the
//! transformer, and the post layer norm on the class token.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::layers::{repeat_rows, Encoder, EncoderShape, LayerNorm, Linear};
use super::{Error, Result};

#[derive(Clone, Debug)]
pub struct VisionTransformer {
    /// The patch convolution as a dense layer over flattened patches.
    patch_embedding: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    image_size: usize,
    patch_size: usize,
}

impl VisionTransformer {
    /// Loads the weights under `vision_model.` of a Hugging Face checkpoint.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let embeddings = vb.pp("embeddings");
        let patch = embeddings.pp("patch_embedding").get((h, cfg.num_channels, p, p), "weight")?;
        let shape = EncoderShape {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            activation: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        Ok(Self {
            patch_embedding: Linear::new(patch.reshape((h, cfg.num_channels * p * p))?, None)?,
            class_embedding: embeddings.get(h, "class_embedding")?,
            position_embedding: embeddings.pp("position_embedding").get((cfg.num_positions(), h), "weight")?,
            // The misspelling is the checkpoint's key.
            pre_layrnorm: LayerNorm::load(vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            encoder: Encoder::load(vb.pp("encoder"), &shape)?,
            post_layernorm: LayerNorm::load(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            image_size: cfg.image_size,
            patch_size: p,
        })
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
        let h = self.class_embedding.dim(0)?;
        // A stride-p convolution with a p x p kernel is a matrix product over
        // non-overlapping patches: (b*g*g, 3*p*p) x (3*p*p, hidden). Pixels past
        // the last whole patch are dropped, as the convolution drops them.
        let pixels = pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)?;
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let patches = self.patch_embedding.forward(&patches)?.reshape((b, g * g, h))?;
        let x = if self.class_embedding.track_op() || self.position_embedding.track_op() {
            let class = repeat_rows(&self.class_embedding, b)?.reshape((b, 1, h))?;
            super::ops::add_rows(&Tensor::cat(&[&class, &patches], 1)?, &self.position_embedding)?
        } else {
            let class = self.class_embedding.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
            Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?
        };
        let x = self.pre_layrnorm.forward(&x)?;
        let x = self.encoder.forward(&x, None)?;
        let class = x.narrow(1, 0, 1)?.squeeze(1)?;
        self.post_layernorm.forward(&class)
    }
}
