//! The text tower (`CLIPTextTransformer`): token and position embeddings, a
//! causal transformer, and the final layer norm at the end-of-text position.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::config::TextConfig;
use super::layers::{causal_mask, Encoder, EncoderShape, LayerNorm};
use super::{Error, Result};

#[derive(Clone, Debug)]
pub struct TextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl TextTransformer {
    /// Loads the weights under `text_model.` of a Hugging Face checkpoint.
    pub fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let embeddings = vb.pp("embeddings");
        let shape = EncoderShape {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            activation: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        Ok(Self {
            token_embedding: embeddings.pp("token_embedding").get((cfg.vocab_size, h), "weight")?,
            position_embedding: embeddings.pp("position_embedding").get((cfg.max_position_embeddings, h), "weight")?,
            encoder: Encoder::load(vb.pp("encoder"), &shape)?,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Returns the pooled (batch, hidden) states at the given positions.
    ///
    /// `ids` is (batch, seq) of u32, padded to the longest sequence of the
    /// batch; `pool` holds, per row, the position of the end-of-text token.
    /// The causal mask keeps padding after that position from having any
    /// effect, so a batch padded to its longest text gives the same result as
    /// the reference padded to 77 positions.
    pub fn forward(&self, ids: &Tensor, pool: &[usize]) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if n > self.max_positions {
            return Err(Error::Input(format!("{n} tokens, the model takes at most {}", self.max_positions)));
        }
        if pool.len() != b || pool.iter().any(|&p| p >= n) {
            return Err(Error::Input("pooling positions do not match the token batch".into()));
        }
        let h = self.token_embedding.dim(1)?;
        let tokens = self.token_embedding.embedding(&ids.flatten_all()?)?.reshape((b, n, h))?;
        let positions = self.position_embedding.narrow(0, 0, n)?;
        let x = if positions.track_op() {
            super::ops::add_rows(&tokens, &positions)?
        } else {
            tokens.broadcast_add(&positions)?
        };
        let mask = causal_mask(n, ids.device())?;
        let x = self.encoder.forward(&x, Some(&mask))?;
        // Layer norm is per position: normalising only the pooled rows is exact.
        let rows: Vec<u32> = pool.iter().enumerate().map(|(i, &p)| (i * n + p) as u32).collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?.to_device(x.device())?;
        let pooled = x.reshape((b * n, h))?.index_select(&rows, 0)?;
        self.final_layer_norm.forward(&pooled)
    }
}
