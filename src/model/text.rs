//! The text tower: token and position embeddings, a transformer, and the
//! final layer norm at the pooled position.
//!
//! CLIP (`CLIPTextTransformer`) is causal and pools the end-of-text token.
//! SigLIP (`SiglipTextTransformer`) attends both ways over a fixed-length,
//! padded sequence, pools the last position and applies a linear head.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::Precision;
use super::config::{Family, TextConfig};
use super::layers::{
    EmbeddingTable, Encoder, EncoderShape, LayerNorm, Linear, SharedStart, causal_mask,
};
use super::tensor_file::TensorFile;
use super::{Error, Result};

#[derive(Clone, Debug)]
pub struct TextTransformer {
    token_embedding: EmbeddingTable,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    /// SigLIP's head; CLIP projects outside the tower.
    head: Option<Linear>,
    causal: bool,
    max_positions: usize,
}

impl TextTransformer {
    /// Loads the weights under `text_model.` of a Hugging Face checkpoint.
    /// `file`, where the weights come from a safetensors file, leaves the
    /// token table there ([`EmbeddingTable`]).
    pub fn load(
        vb: VarBuilder,
        cfg: &TextConfig,
        family: Family,
        file: Option<&TensorFile>,
    ) -> Result<Self> {
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
            token_embedding: EmbeddingTable::load(
                embeddings.pp("token_embedding"),
                (cfg.vocab_size, h),
                file,
            )?,
            position_embedding: embeddings
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, h), "weight")?,
            encoder: {
                let mut encoder = Encoder::load(vb.pp("encoder"), &shape)?;
                // SigLIP's rows are its fixed context (64); CLIP's a query's
                // own tokens, a dozen or so.
                if family == Family::Siglip {
                    encoder.lay_out_for(cfg.max_position_embeddings)?;
                }
                encoder
            },
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            head: match family {
                Family::Clip => None,
                Family::Siglip => Some(Linear::load(
                    vb.pp("head"),
                    h,
                    cfg.projection_size.unwrap_or(h),
                    true,
                )?),
            },
            causal: family == Family::Clip && !cfg.no_causal_mask,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// The encoder's dense layers in `precision`; embeddings, layer norms and the
    /// head stay f32.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.encoder.reduce_to(precision)
    }

    /// Returns the pooled (batch, hidden) states at the given positions,
    /// through the head when the tower has one.
    ///
    /// `ids` is (batch, seq) of u32; `pool` holds, per row, the position to
    /// pool. For CLIP that is the end-of-text token, and rows may be padded to
    /// the longest of the batch: the causal mask keeps padding after that
    /// position from having any effect, so the result is the reference's at
    /// 77 positions. SigLIP attends both ways, so its rows are the
    /// tokenizer's fixed length and the pooled position is the last.
    pub fn forward(&self, ids: &Tensor, pool: &[usize]) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if n > self.max_positions {
            return Err(Error::Input(format!(
                "{n} tokens, the model takes at most {}",
                self.max_positions
            )));
        }
        if pool.len() != b || pool.iter().any(|&p| p >= n) {
            return Err(Error::Input(
                "pooling positions do not match the token batch".into(),
            ));
        }
        let h = self.token_embedding.width()?;
        let tokens = self
            .token_embedding
            .embedding(&ids.flatten_all()?)?
            .reshape((b, n, h))?;
        let positions = self.position_embedding.narrow(0, 0, n)?;
        let x = if positions.track_op() {
            super::ops::add_rows(&tokens, &positions)?
        } else {
            tokens.broadcast_add(&positions)?
        };
        let mask = if self.causal {
            Some(causal_mask(n, ids.device())?)
        } else {
            None
        };
        self.pooled_out(&self.encoder.forward_rows(&x, mask.as_ref(), pool)?)
    }

    /// Whether texts that begin alike can share their beginning's states
    /// ([`Self::forward_after`]): in a causal inference tower, a position's
    /// states do not depend on the tokens after it.
    pub fn shares_beginnings(&self) -> bool {
        self.causal && !self.position_embedding.track_op()
    }

    /// [`Self::forward`] of texts that all begin with the tokens `first`,
    /// whose positions go through the tower once for all of them. `own[i]`
    /// is text `i`'s tokens after `first`, as many as it has: none is
    /// padded to a longer one. `pool` is the pooled position of each text,
    /// counted from its start as in [`Self::forward`]. The same result as
    /// [`Self::forward`] of each whole text, up to float rounding, for
    /// about the tokens of the own parts alone: the tag vocabulary's 2,476
    /// prompts (four templates) hold 22,852 tokens, their own parts 7,996.
    pub fn forward_after(&self, first: &[u32], own: &[&[u32]], pool: &[usize]) -> Result<Tensor> {
        let p = first.len();
        if !self.shares_beginnings() {
            return Err(Error::Input(
                "only a causal tower in inference shares the beginning of texts".into(),
            ));
        }
        if p == 0 || own.is_empty() || own.iter().any(|t| t.is_empty()) {
            return Err(Error::Input(
                "texts sharing a beginning need at least one token of it and one of their own"
                    .into(),
            ));
        }
        let longest = own.iter().map(|t| t.len()).max().unwrap_or(0);
        if p + longest > self.max_positions {
            return Err(Error::Input(format!(
                "{p} shared and up to {longest} own tokens, the model takes at most {}",
                self.max_positions
            )));
        }
        if pool.len() != own.len()
            || pool
                .iter()
                .zip(own)
                .any(|(&r, t)| r < p || r >= p + t.len())
        {
            return Err(Error::Input(
                "pooling positions do not follow the shared beginning".into(),
            ));
        }
        let device = self.position_embedding.device();
        let ids: Vec<u32> = first
            .iter()
            .chain(own.iter().copied().flatten())
            .copied()
            .collect();
        // Each text's own tokens take positions from p on.
        let positions: Vec<u32> = (0..p)
            .chain(own.iter().flat_map(|t| p..p + t.len()))
            .map(|i| i as u32)
            .collect();
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, rows, device)?;
        let positions = Tensor::from_vec(positions, rows, device)?;
        let x = (self.token_embedding.embedding(&ids)?
            + self.position_embedding.index_select(&positions, 0)?)?;
        let at: Vec<usize> = pool.iter().map(|&r| r - p).collect();
        let lens: Vec<usize> = own.iter().map(|t| t.len()).collect();
        let shape = SharedStart {
            first: p,
            own: &lens,
        };
        self.pooled_out(&self.encoder.forward_shared(&x, shape, &at)?)
    }

    /// The final layer norm and the head, if any, of the pooled rows. Layer
    /// norm is per position: normalising only the pooled rows is exact.
    fn pooled_out(&self, pooled: &Tensor) -> Result<Tensor> {
        let pooled = self.final_layer_norm.forward(pooled)?;
        match &self.head {
            Some(head) => head.forward(&pooled),
            None => Ok(pooled),
        }
    }
}
