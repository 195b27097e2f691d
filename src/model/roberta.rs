//! A Hugging Face text tower inside an open_clip model: XLM-RoBERTa or
//! RoBERTa (`XLMRobertaModel` / `RobertaModel`) through open_clip's
//! `HFTextEncoder`, which is what LAION's multilingual models
//! (`xlm-roberta-base-ViT-B-32`, `xlm-roberta-large-ViT-H-14`) pair with
//! their image towers.
//!
//! BERT's post-norm layers: word, position and token-type embeddings summed
//! and layer-normalised; each layer adds attention, then normalises, adds the
//! feed-forward block, then normalises. Positions count from the padding id
//! plus one over the non-padding tokens, padding is masked out of attention,
//! and open_clip pools the mean of the non-padding states (or the first
//! token) and projects through a two-layer MLP with exact GELU (or one
//! linear layer).
//!
//! The weights are read under `text_model.` with the names `open_clip::remap`
//! gives them: transformers' `attention.self.query` becomes `self_attn.q_proj`
//! and so on, so `Attention`, `Mlp` and `LayerNorm` load as in the other
//! towers.

use candle_core::{D, Tensor};
use candle_nn::VarBuilder;

use super::Precision;
use super::config::{HfTextTower, TextConfig, TextPooler, TextProjection};
use super::layers::{
    Attention, EmbeddingTable, EncoderShape, LayerNorm, Linear, Mlp, converted_on_load,
};
use super::tensor_file::TensorFile;
use super::{Error, Result};

#[derive(Clone, Debug)]
struct PostNormLayer {
    attention: Attention,
    norm1: LayerNorm,
    mlp: Mlp,
    norm2: LayerNorm,
}

impl PostNormLayer {
    fn load(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        Ok(Self {
            attention: Attention::load(vb.pp("self_attn"), s.hidden, s.heads)?,
            norm1: LayerNorm::load(vb.pp("layer_norm1"), s.hidden, s.eps)?,
            mlp: Mlp::load(vb.pp("mlp"), s.hidden, s.intermediate, s.activation)?,
            norm2: LayerNorm::load(vb.pp("layer_norm2"), s.hidden, s.eps)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .norm1
            .forward(&(self.attention.forward(x, Some(mask))? + x)?)?;
        self.norm2.forward(&(self.mlp.forward(&h)? + &h)?)
    }

    fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.attention.reduce_to(precision)?;
        self.mlp.reduce_to(precision)
    }
}

/// The projection open_clip puts after the pooled state.
#[derive(Clone, Debug)]
enum Projection {
    None,
    Linear(Linear),
    /// Linear, exact GELU, linear; no biases.
    Mlp(Linear, Linear),
}

#[derive(Clone, Debug)]
pub struct HfTextTransformer {
    word_embeddings: EmbeddingTable,
    position_embeddings: Tensor,
    /// The first token type's row (open_clip passes no token types).
    token_type: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<PostNormLayer>,
    projection: Projection,
    pooler: TextPooler,
    pad: u32,
    heads: usize,
    max_positions: usize,
}

impl HfTextTransformer {
    /// Loads the tower under `text_model.` and its projection under
    /// `text_projection.` (`vb` is the checkpoint's root); `output_dim` is the
    /// embedding size.
    pub fn load(
        vb: VarBuilder,
        cfg: &TextConfig,
        hf: &HfTextTower,
        output_dim: usize,
        file: Option<&TensorFile>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let t = vb.pp("text_model");
        let e = t.pp("embeddings");
        let pad = cfg.pad_token_id.ok_or_else(|| {
            Error::Config("the Hugging Face text tower has no pad_token_id".into())
        })?;
        let shape = EncoderShape {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            activation: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = t.pp("encoder").pp("layers").pp(i);
                converted_on_load(|| PostNormLayer::load(vb, &shape), PostNormLayer::reduce_to)
            })
            .collect::<Result<Vec<_>>>()?;
        let p = vb.pp("text_projection");
        let projection = match hf.projection {
            TextProjection::None => Projection::None,
            TextProjection::Linear => Projection::Linear(Linear::load(p, h, output_dim, false)?),
            TextProjection::Mlp => {
                let mid = (h + output_dim) / 2;
                Projection::Mlp(
                    Linear::load(p.pp("0"), h, mid, false)?,
                    Linear::load(p.pp("2"), mid, output_dim, false)?,
                )
            }
        };
        Ok(Self {
            word_embeddings: EmbeddingTable::load(
                e.pp("word_embeddings"),
                (cfg.vocab_size, h),
                file,
            )?,
            position_embeddings: e
                .pp("position_embeddings")
                .get((cfg.max_position_embeddings, h), "weight")?,
            token_type: e
                .pp("token_type_embeddings")
                .get((hf.type_vocab_size.max(1), h), "weight")?
                .narrow(0, 0, 1)?,
            embeddings_norm: LayerNorm::load(e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            projection,
            pooler: hf.pooler,
            pad,
            heads: cfg.num_attention_heads,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// The encoder layers' dense layers in `precision`; embeddings, layer norms
    /// and the projection stay f32.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.reduce_to(precision))
    }

    /// (batch, seq) ids, each row padded with the pad id, to (batch, output) features.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let rows = ids.to_vec2::<u32>()?;
        // transformers' create_position_ids_from_input_ids: pad + 1 + the
        // count of non-padding tokens so far; padding sits at `pad`.
        let mut positions = Vec::with_capacity(b * n);
        let mut keep = Vec::with_capacity(b * n);
        for row in &rows {
            let mut seen = 0u32;
            for &id in row {
                if id == self.pad {
                    positions.push(self.pad);
                    keep.push(0f32);
                } else {
                    seen += 1;
                    positions.push(self.pad + seen);
                    keep.push(1f32);
                }
            }
        }
        if let Some(&p) = positions.iter().max()
            && p as usize >= self.max_positions
        {
            return Err(Error::Input(format!(
                "{n} tokens, the text tower takes at most {}",
                self.max_positions as u32 - self.pad - 1
            )));
        }
        let device = ids.device();
        let h = self.word_embeddings.width()?;
        let words = self.word_embeddings.embedding(&ids.flatten_all()?)?;
        let positions = Tensor::from_vec(positions, b * n, device)?;
        let x = (words + self.position_embeddings.embedding(&positions)?)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.embeddings_norm.forward(&x.reshape((b, n, h))?)?;
        let keep = Tensor::from_vec(keep, (b, n), device)?;
        // Additive key mask, a very negative score for padding as
        // transformers' has it, per (row, head) as the attention's scores are laid out.
        let mask = ((keep.ones_like()? - &keep)? * f32::MIN as f64)?
            .reshape((b, 1, 1, n))?
            .broadcast_as((b, self.heads, 1, n))?
            .reshape((b * self.heads, 1, n))?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        let pooled = match self.pooler {
            TextPooler::Mean => {
                let sum = x.broadcast_mul(&keep.unsqueeze(D::Minus1)?)?.sum(1)?;
                sum.broadcast_div(&keep.sum_keepdim(1)?)?
            }
            TextPooler::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        match &self.projection {
            Projection::None => Ok(pooled),
            Projection::Linear(l) => l.forward(&pooled),
            Projection::Mlp(a, c) => c.forward(&a.forward(&pooled)?.gelu_erf()?),
        }
    }
}
