//! The transformer building blocks both CLIP towers share.
//!
//! Each layer runs two ways. When a weight is a trainable variable, it uses
//! only operations with a backward pass (candle's fused layer norm and
//! softmax have none; `ops` has fused ones that do). Otherwise it takes the fast inference path: fused
//! layer norm and softmax, and one matrix multiply for the query, key and
//! value projections.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::Precision;
use super::bf16::{Bf16Matrix, LayerKind};
use super::gemm::{PackedMatrix, Prepacked};
use super::int8::Int8Matrix;
use super::tensor_file::{FileRows, TensorFile};

use super::Result;
use super::config::Activation;

/// A table of token or word embeddings, looked up by id: in memory (a
/// trainable or renamed checkpoint's), or left in the safetensors file and
/// read a row at a time ([`FileRows`]), which keeps a vocabulary's tens or
/// hundreds of MB out of an index or a server that embeds a dozen tokens a
/// query. Both give the same values.
#[derive(Clone, Debug)]
pub enum EmbeddingTable {
    Loaded(Tensor),
    InFile(FileRows),
}

impl EmbeddingTable {
    /// The (rows, columns) table `weight` under `vb`: from `file` when it
    /// holds it (an error if with another shape), else loaded.
    pub fn load(vb: VarBuilder, shape: (usize, usize), file: Option<&TensorFile>) -> Result<Self> {
        let name = format!("{}.weight", vb.prefix());
        match file.map(|f| f.rows(&name, shape)).transpose()?.flatten() {
            Some(rows) => Ok(Self::InFile(rows)),
            None => Ok(Self::Loaded(vb.get(shape, "weight")?)),
        }
    }

    /// Columns: the embedding width.
    pub fn width(&self) -> Result<usize> {
        Ok(match self {
            Self::Loaded(t) => t.dim(1)?,
            Self::InFile(rows) => rows.dims().1,
        })
    }

    /// The rows of the 1-D u32 `ids`, as (ids, width).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Loaded(t) => t.embedding(ids)?,
            Self::InFile(rows) => rows.gather(&ids.to_vec1::<u32>()?)?,
        })
    }
}

/// `t` repeated as `rows` rows: (rows, t's elements), as `ones(rows, 1) x t`.
///
/// For trainable tensors this replaces a broadcast: the gradient of a
/// broadcast is a sum over the repeated dimension, which candle computes
/// slowly when it is not the last one, while the gradient of this product is
/// one matrix multiply (`ones^T x dy`). In training it is most of the cost of
/// biases, gains and position embeddings.
pub fn repeat_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let ones = Tensor::ones((rows, 1), t.dtype(), t.device())?;
    Ok(ones.matmul(&t.reshape((1, t.elem_count()))?)?)
}

/// How an inference layer stores its weight for gemm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightLayout {
    /// `W^T` contiguous as (in, out).
    #[default]
    InOut,
    /// `W` as the checkpoint has it, (out, in), multiplied as a transposed view.
    OutIn,
}

/// How a dense layer holds its weight.
#[derive(Clone, Debug)]
enum Weight {
    /// (out, in), in the autograd graph: a trainable variable, or a frozen
    /// layer that must keep its own layout for the fused training node.
    Graph(Tensor),
    /// For inference through candle's product, stored as `WeightLayout` says,
    /// so gemm reads it in place instead of repacking a copy on every call
    /// (5x faster for a short text query than the checkpoint's layout).
    Plain(Tensor, WeightLayout),
    /// For inference through a kernel with its own layout, made once at
    /// load: [`super::gemm`]'s f32 panels where the CPU has AVX-512,
    /// [`super::bf16`]'s AMX tiles for `--precision fast`.
    Prepacked(Arc<dyn Prepacked>),
}

thread_local! {
    /// Whether inference weights made now stay as read ([`converted_on_load`]).
    static PACK_LATER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A layer loaded by `load` and converted by `reduce` at once, where the
/// model is loaded for a reduced precision ([`super::bf16::convert_on_load`]);
/// else loaded as it is. Its weights are not packed in f32 on the way: the
/// packed copy would only be unpacked again to convert it, two fresh
/// copies of every weight. `reduce` packs what stays f32
/// ([`Linear::reduce_to`]).
pub(super) fn converted_on_load<L>(
    load: impl FnOnce() -> Result<L>,
    reduce: impl FnOnce(&mut L, Precision) -> Result<()>,
) -> Result<L> {
    let Some(precision) = super::bf16::convert_on_load() else {
        return load();
    };
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PACK_LATER.set(false);
        }
    }
    PACK_LATER.set(true);
    let reset = Reset;
    let mut layer = load()?;
    drop(reset);
    reduce(&mut layer, precision)?;
    Ok(layer)
}

/// An inference layer's laid-out weight and its bias values
/// ([`Linear::prepacked`]).
pub(super) type PackedLayer = (Arc<dyn Prepacked>, Option<Vec<f32>>);

/// A dense layer, `x W^T + b`, over the last dimension of any-rank input.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its (out, in) weight.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        // `track_op`, not `is_variable`: a reshaped variable is no variable
        // itself, and a transposed copy of it would freeze the forward pass
        // at its initial value while the optimiser moves the variable.
        let weight = if weight.track_op() {
            Weight::Graph(weight)
        } else if PACK_LATER.get() {
            Weight::Plain(weight, WeightLayout::OutIn)
        } else if let Some(packed) = PackedMatrix::new(&weight)? {
            Weight::Prepacked(Arc::new(packed))
        } else {
            Weight::Plain(weight.t()?.contiguous()?, WeightLayout::InOut)
        };
        Ok(Self { weight, bias })
    }

    /// Stores an inference layer's weight for candle's product in `layout`
    /// (trainable and packed layers keep theirs).
    pub fn relayout(&mut self, layout: WeightLayout) -> Result<()> {
        if let Weight::Plain(w, current) = &mut self.weight
            && *current != layout
        {
            *w = w.t()?.contiguous()?;
            *current = layout;
        }
        Ok(())
    }

    /// Converts an inference layer's weight for `precision` (`fast` or
    /// `int8`): int8 tiles for `int8` where AMX-INT8 or AVX512-VNNI runs
    /// them ([`super::int8`]), else bf16 tiles on AMX or AVX512-BF16, else
    /// bf16 panels for the AVX2 kernel ([`PackedMatrix::bf16`]),
    /// else kept in f32 rounded to bf16 (so that the layer computes nearly
    /// the same either way). Trainable layers, and layers of a kind
    /// that stays f32 ([`super::bf16::converts`]), keep their weight.
    pub fn reduce_to(&mut self, kind: LayerKind, precision: Precision) -> Result<()> {
        if !super::bf16::converts(kind) {
            return self.settle();
        }
        let tiles = super::bf16::available() || super::int8::available();
        self.reduce_to_with(kind, precision, tiles)
    }

    /// [`Self::reduce_to`] with the tile kernels (`tiles`: AMX or AVX-512 dot
    /// products, where available) or without them.
    fn reduce_to_with(&mut self, kind: LayerKind, precision: Precision, tiles: bool) -> Result<()> {
        match &self.weight {
            Weight::Graph(_) => return Ok(()),
            Weight::Prepacked(p) if p.is_reduced() => return Ok(()),
            _ => {}
        }
        let w = self.weight()?;
        let int8 = tiles && precision == Precision::Int8 && super::bf16::int8_for(kind);
        let int8 = match int8 {
            true => Int8Matrix::new(&w)?,
            false => None,
        };
        let matrix: Option<Arc<dyn Prepacked>> = match (int8, tiles) {
            (Some(m), _) => Some(Arc::new(m)),
            (None, true) => Bf16Matrix::new(&w)?.map(|m| Arc::new(m) as _),
            (None, false) => PackedMatrix::bf16(&w)?.map(|m| Arc::new(m) as _),
        };
        self.weight = match matrix {
            Some(m) => Weight::Prepacked(m),
            None => {
                let rounded = w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
                Self::new(rounded, None)?.weight
            }
        };
        Ok(())
    }

    /// Packs a weight left as read ([`converted_on_load`]) for the f32
    /// kernel, where the CPU has one.
    fn settle(&mut self) -> Result<()> {
        if let Weight::Plain(w, WeightLayout::OutIn) = &self.weight
            && let Some(packed) = PackedMatrix::new(w)?
        {
            self.weight = Weight::Prepacked(Arc::new(packed));
        }
        Ok(())
    }

    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// The (out, in) weight.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Plain(w, WeightLayout::InOut) => Ok(w.t()?),
            Weight::Graph(w) | Weight::Plain(w, WeightLayout::OutIn) => Ok(w.clone()),
            Weight::Prepacked(p) => Ok(p.unpack()?),
        }
    }

    /// Whether the layer is part of a training graph.
    fn trainable(&self) -> bool {
        matches!(&self.weight, Weight::Graph(w) if w.track_op())
    }

    fn out_dim(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::Plain(w, WeightLayout::InOut) => w.dim(1)?,
            Weight::Graph(w) | Weight::Plain(w, WeightLayout::OutIn) => w.dim(0)?,
            Weight::Prepacked(p) => p.dims().0,
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight as laid out for an inference kernel, with the bias as
    /// values, where the layer has one and is outside any training graph:
    /// for a caller that makes the layer's input rows itself
    /// ([`super::gemm::Prepacked::product_of`]).
    pub(super) fn prepacked(&self) -> Result<Option<PackedLayer>> {
        let Weight::Prepacked(p) = &self.weight else {
            return Ok(None);
        };
        let bias = match &self.bias {
            Some(b) if b.track_op() => return Ok(None),
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Some((p.clone(), bias)))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, super::ops::Pointwise::Identity)
    }

    /// `f(x W^T + b)`; for inference, the bias and `f` are applied in one pass
    /// over the product, in place.
    pub(super) fn forward_then(&self, x: &Tensor, f: super::ops::Pointwise) -> Result<Tensor> {
        use super::ops::Pointwise::Identity;
        let layout = match &self.weight {
            Weight::Graph(w) => {
                // Training: one fused node with its own backward pass.
                let y = super::ops::dense(x, w, self.bias.as_ref())?;
                return match f {
                    Identity => Ok(y),
                    _ => Err(super::Error::Input(
                        "fused activations are for inference".into(),
                    )),
                };
            }
            Weight::Prepacked(p)
                if !x.track_op() && !self.bias.as_ref().is_some_and(|b| b.track_op()) =>
            {
                return Ok(super::gemm::dense_with(
                    x,
                    p.clone(),
                    self.bias.as_ref(),
                    f,
                )?);
            }
            // A frozen packed layer inside a training graph (fed by a
            // trainable one): candle's product, which has a backward pass.
            Weight::Prepacked(p) => return self.forward_graph(x, &p.plain()?, f),
            Weight::Plain(w, layout) => (w, *layout),
        };
        let w = match layout.1 {
            WeightLayout::InOut => layout.0.clone(),
            WeightLayout::OutIn => layout.0.t()?,
        };
        self.forward_graph(x, &w, f)
    }

    /// `f(x w + b)` with candle's product, for a weight `w` as (in, out).
    fn forward_graph(&self, x: &Tensor, w: &Tensor, f: super::ops::Pointwise) -> Result<Tensor> {
        use super::ops::Pointwise::Identity;
        let dims = x.dims().to_vec();
        let (in_dim, lead) = dims
            .split_last()
            .expect("linear input has at least one dimension");
        let rows: usize = lead.iter().product();
        // One (rows x in) by (in x out) product: gemm is fastest on one big
        // matrix, not a batch of small ones.
        let x = x.reshape((rows, *in_dim))?;
        let y = x.matmul(w)?;
        let y = match (&self.bias, f) {
            // Inference: the product is a fresh buffer of its own; the bias
            // and `f` go in place, in one pass.
            (Some(b), _) if !y.track_op() && !b.track_op() => {
                super::ops::bias_in_place(&y, b, f)?;
                y
            }
            (None, Identity) => y,
            (None, _) if !y.track_op() => {
                super::ops::bias_in_place(
                    &y,
                    &Tensor::zeros(self.out_dim()?, y.dtype(), y.device())?,
                    f,
                )?;
                y
            }
            // The graph tracks it (a trainable bias, or a frozen layer fed by
            // a trainable one): graph nodes.
            (Some(b), Identity) if b.track_op() => super::ops::add_rows(&y, b)?,
            (Some(b), Identity) => y.broadcast_add(b)?,
            _ => {
                return Err(super::Error::Input(
                    "fused activations are for inference".into(),
                ));
            }
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim()?);
        Ok(y.reshape(out_dims)?)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// In training and in inference alike (`ops::layer_norm`: blocks of 32
    /// rows in vector lanes). candle's own made a task of each row; this
    /// one is about 1% faster on a 10-token query and on an image at batch
    /// 1 (BENCHMARKS.md).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(super::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Activation::Gelu if x.track_op() => super::ops::gelu_erf(x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh if x.track_op() => x.gelu()?,
            Activation::GeluTanh => super::ops::gelu_tanh(x)?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// How q, k and v are computed.
#[derive(Clone, Debug)]
enum Qkv {
    /// Three layers, each its own trainable variable.
    Separate { q: Linear, k: Linear, v: Linear },
    /// One layer of the three stacked, for inference: one matrix multiply.
    Fused(Linear),
}

/// Multi-head self-attention (`CLIPAttention`).
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Qkv,
    out_proj: Linear,
    num_heads: usize,
}

impl Attention {
    pub fn load(vb: VarBuilder, hidden: usize, num_heads: usize) -> Result<Self> {
        let get = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                vb.pp(name).get((hidden, hidden), "weight")?,
                vb.pp(name).get(hidden, "bias")?,
            ))
        };
        let (q, k, v) = (get("q_proj")?, get("k_proj")?, get("v_proj")?);
        let qkv = if q.0.track_op() {
            Qkv::Separate {
                q: Linear::new(q.0, Some(q.1))?,
                k: Linear::new(k.0, Some(k.1))?,
                v: Linear::new(v.0, Some(v.1))?,
            }
        } else {
            let w = Tensor::cat(&[&q.0, &k.0, &v.0], 0)?;
            let b = Tensor::cat(&[&q.1, &k.1, &v.1], 0)?;
            Qkv::Fused(Linear::new(w, Some(b))?)
        };
        let out_proj = Linear::load(vb.pp("out_proj"), hidden, hidden, true)?;
        Ok(Self {
            qkv,
            out_proj,
            num_heads,
        })
    }

    /// `x` is (batch, seq, hidden); `mask` is an additive (seq, seq) mask.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let out = match &self.qkv {
            Qkv::Fused(qkv) => {
                super::ops::attend_inference(&qkv.forward(x)?, self.num_heads, mask)?
            }
            // One product with the three weights stacked (stacking is
            // differentiable): the input is read once, and its gradient
            // arrives in one piece instead of three to add up. Then one
            // fused node with its own backward pass.
            Qkv::Separate { q, k, v } => {
                let w = Tensor::cat(&[&q.weight()?, &k.weight()?, &v.weight()?], 0)?;
                let b =
                    [&q.bias, &k.bias, &v.bias].map(|b| b.clone().expect("attention has biases"));
                let qkv = Linear {
                    weight: Weight::Graph(w),
                    bias: Some(Tensor::cat(&b, 0)?),
                }
                .forward(x)?;
                super::ops::attention(&qkv, self.num_heads, mask)?
            }
        };
        self.out_proj.forward(&out)
    }

    /// [`Self::forward`] at position `rows[i]` of each sequence `i` only:
    /// (batch, hidden). In inference only those rows are attended from and
    /// projected; a training graph computes every row and selects.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        match &self.qkv {
            Qkv::Fused(qkv) => {
                let out = super::ops::attend_inference_rows(
                    &qkv.forward(x)?,
                    self.num_heads,
                    mask,
                    rows,
                )?;
                self.out_proj.forward(&out)
            }
            Qkv::Separate { .. } => Ok(super::ops::select_rows(&self.forward(x, mask)?, rows)?),
        }
    }

    /// [`Self::forward`] for sequences with a shared beginning, laid out as
    /// [`SharedStart`] says: its positions' keys and values are computed
    /// once and serve every sequence, as if each held them. Every row, as
    /// laid out; with `at`, row `at[i]` of each sequence's own part only,
    /// (batch, hidden). Causal (a shared beginning cannot see what follows
    /// it), inference only.
    pub fn forward_shared(
        &self,
        x: &Tensor,
        s: SharedStart,
        at: Option<&[usize]>,
    ) -> Result<Tensor> {
        use super::ops::{attend_inference, attend_inference_shared};
        let Qkv::Fused(qkv) = &self.qkv else {
            return Err(super::Error::Input(
                "a shared beginning is for inference".into(),
            ));
        };
        let qkv = qkv.forward(x)?;
        // Each sequence's keys and values are the beginning's rows, stored
        // once, then its own: the attention reads both where they lie.
        let longest = s.first + s.own.iter().copied().max().unwrap_or(0);
        let mask = causal_mask(longest, x.device())?;
        let heads = self.num_heads;
        let out = match at {
            Some(at) => {
                let rows: Vec<usize> = at.iter().map(|r| s.first + r).collect();
                attend_inference_shared(&qkv, heads, Some(&mask), s.first, s.own, Some(&rows))?
            }
            None => {
                let own = causal_mask(s.first, x.device())?;
                let first = qkv.narrow(0, 0, s.first)?.unsqueeze(0)?;
                let first = attend_inference(&first, heads, Some(&own))?.squeeze(0)?;
                let rest = attend_inference_shared(&qkv, heads, Some(&mask), s.first, s.own, None)?;
                Tensor::cat(&[&first, &rest], 0)?
            }
        };
        self.out_proj.forward(&out)
    }

    /// The projections in reduced precision ([`Linear::reduce_to`]).
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        match &mut self.qkv {
            Qkv::Fused(qkv) => qkv.reduce_to(LayerKind::Qkv, precision)?,
            Qkv::Separate { q, k, v } => {
                q.reduce_to(LayerKind::Qkv, precision)?;
                k.reduce_to(LayerKind::Qkv, precision)?;
                v.reduce_to(LayerKind::Qkv, precision)?;
            }
        }
        self.out_proj.reduce_to(LayerKind::AttentionOut, precision)
    }
}

/// The two-layer feed-forward block (`CLIPMLP`).
#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Mlp {
    pub fn load(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        activation: Activation,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(vb.pp("fc1"), hidden, intermediate, true)?,
            fc2: Linear::load(vb.pp("fc2"), intermediate, hidden, true)?,
            activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused = match self.activation {
            _ if x.track_op() || self.fc1.trainable() => None,
            Activation::GeluTanh => Some(super::ops::Pointwise::GeluTanh),
            Activation::Gelu => Some(super::ops::Pointwise::GeluErf),
            Activation::QuickGelu => Some(super::ops::Pointwise::QuickGelu),
            Activation::Relu | Activation::Silu => None,
        };
        let x = match fused {
            // Inference: bias and activation in one pass over fc1's product.
            Some(f) => self.fc1.forward_then(x, f)?,
            None => self.activation.forward(&self.fc1.forward(x)?)?,
        };
        self.fc2.forward(&x)
    }

    /// Both layers in reduced precision ([`Linear::reduce_to`]).
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.fc1.reduce_to(LayerKind::MlpUp, precision)?;
        self.fc2.reduce_to(LayerKind::MlpDown, precision)
    }
}

/// One pre-norm transformer layer (`CLIPEncoderLayer`).
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

/// Shape of one tower's encoder.
#[derive(Clone, Copy, Debug)]
pub struct EncoderShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub activation: Activation,
    pub eps: f64,
}

impl EncoderLayer {
    pub fn load(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), s.hidden, s.heads)?,
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), s.hidden, s.eps)?,
            mlp: Mlp::load(vb.pp("mlp"), s.hidden, s.intermediate, s.activation)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), s.hidden, s.eps)?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_at(x, mask, Rows::All)
    }

    /// [`Self::forward`] at position `rows[i]` of each sequence `i` only:
    /// (batch, hidden). Every position is still a key and a value; the
    /// queries, the output projection and the MLP take only these rows.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        self.forward_at(x, mask, Rows::Pooled(rows))
    }

    /// The output of the rows `rows` names.
    fn forward_at(&self, x: &Tensor, mask: Option<&Tensor>, rows: Rows) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(x)?;
        let (attended, kept) = match rows {
            Rows::All => (self.self_attn.forward(&normed, mask)?, x.clone()),
            Rows::Pooled(at) => (
                self.self_attn.forward_rows(&normed, mask, at)?,
                super::ops::select_rows(x, at)?,
            ),
            Rows::Shared(s, at) => (
                self.self_attn.forward_shared(&normed, s, at)?,
                match at {
                    None => x.clone(),
                    Some(at) => s.select(x, at)?,
                },
            ),
        };
        let x = residual(attended, &kept)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        residual(h, &x)
    }

    /// The attention's and the MLP's dense layers in `precision`; the layer norms
    /// stay f32.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.self_attn.reduce_to(precision)?;
        self.mlp.reduce_to(precision)
    }
}

/// Which rows an [`EncoderLayer`] computes.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Every position of (batch, seq, hidden) sequences.
    All,
    /// Position `at[i]` of each sequence `i`: (batch, hidden).
    Pooled(&'a [usize]),
    /// Every row of sequences laid out with a shared beginning; with `at`,
    /// row `at[i]` of each sequence's own part only.
    Shared(SharedStart<'a>, Option<&'a [usize]>),
}

/// Sequences that begin with the same `first` positions, laid out as one
/// (first + own lengths summed, hidden) matrix: the shared beginning once,
/// then each sequence's own `own[i]` positions, as many as it has (no
/// padding). In a causal tower the beginning's states do not depend on
/// what follows it, so it goes through each layer once for all the
/// sequences; and a sequence's own positions depend on no other's, so
/// none pays for a longer one.
#[derive(Clone, Copy, Debug)]
pub struct SharedStart<'a> {
    pub first: usize,
    pub own: &'a [usize],
}

impl SharedStart<'_> {
    /// Row `at[i]` of each sequence `i`'s own part of `x`: (batch, hidden).
    fn select(&self, x: &Tensor, at: &[usize]) -> Result<Tensor> {
        let rows: Vec<u32> = at
            .iter()
            .zip(self.own)
            .scan(self.first, |start, (&r, &m)| {
                let row = *start + r;
                *start += m;
                Some(row as u32)
            })
            .collect();
        let rows = Tensor::new(rows.as_slice(), x.device())?;
        Ok(x.index_select(&rows, 0)?)
    }
}

/// `h + x` for a block's output `h`: in place in inference, where `h` is the
/// fresh output of a dense layer; a graph node in training.
fn residual(h: Tensor, x: &Tensor) -> Result<Tensor> {
    if h.track_op() || x.track_op() || !h.is_contiguous() {
        return Ok((x + h)?);
    }
    super::ops::add_in_place(&h, x)?;
    Ok(h)
}

/// A stack of encoder layers (`CLIPEncoder`).
#[derive(Clone, Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

/// `x` through `layers` in turn.
fn through(layers: &[EncoderLayer], x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let mut x = x.clone();
    for layer in layers {
        x = layer.forward(&x, mask)?;
    }
    Ok(x)
}

impl Encoder {
    pub fn load(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..s.layers)
            .map(|i| converted_on_load(|| EncoderLayer::load(vb.pp(i), s), EncoderLayer::reduce_to))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        through(&self.layers, x, mask)
    }

    /// The output at position `rows[i]` of each sequence `i`, (batch,
    /// hidden): what a tower pools. In inference the last layer computes
    /// only those rows (its keys and values need every position; its
    /// queries, output projection and MLP do not): 6% less work in a
    /// 12-layer ViT-B/32 that pools one of 50 positions. A training graph
    /// computes every row, as [`Self::forward`] does, and selects.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        let training = x.track_op();
        let Some((last, first)) = self.layers.split_last().filter(|_| !training) else {
            return Ok(super::ops::select_rows(&self.forward(x, mask)?, rows)?);
        };
        last.forward_rows(&through(first, x, mask)?, mask, rows)
    }

    /// [`Self::forward_rows`] for sequences laid out with a shared
    /// beginning (see [`SharedStart`]): the output at row `at[i]` of each
    /// sequence's own part, (batch, hidden). Causal, inference only.
    pub fn forward_shared(&self, x: &Tensor, s: SharedStart, at: &[usize]) -> Result<Tensor> {
        let Some((last, first)) = self.layers.split_last() else {
            return Err(super::Error::Input("an encoder without layers".into()));
        };
        let mut x = x.clone();
        for layer in first {
            x = layer.forward_at(&x, None, Rows::Shared(s, None))?;
        }
        last.forward_at(&x, None, Rows::Shared(s, Some(at)))
    }

    /// Every layer's dense layers in reduced precision
    /// ([`EncoderLayer::reduce_to`]).
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.reduce_to(precision))
    }

    /// Lays the inference weights out for products of about `rows` rows.
    ///
    /// Measured with `cargo bench --bench model -- --only gemm` (2 threads):
    /// at 50 to 64 rows, the MLP's expansion (768 to 3072) runs at about 100
    /// GFLOP/s from (in, out) weights and 150 to 165 from (out, in) read
    /// transposed, while every other product of a layer is 2 to 5 times
    /// slower that way (and a 10-row query's expansion too). So only the
    /// expansion changes, only for one ViT-B/32 image's or one SigLIP text's
    /// rows.
    pub fn lay_out_for(&mut self, rows: usize) -> Result<()> {
        if (32..=150).contains(&rows) {
            for layer in &mut self.layers {
                layer.mlp.fc1.relayout(WeightLayout::OutIn)?;
            }
        }
        Ok(())
    }
}

/// Softmax over the last dimension: candle's fused one for inference, its
/// differentiable composition when the graph tracks `x` (the fused one has
/// no backward pass).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(candle_nn::ops::softmax(x, candle_core::D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// An additive causal mask: 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (n, n), device)?)
}

/// Multi-head attention pooling (SigLIP's `SiglipMultiheadAttentionPoolingHead`):
/// one learned query ("probe") attends over every position through a
/// `torch.nn.MultiheadAttention`, then a residual MLP block on its output.
#[derive(Clone, Debug)]
pub struct AttentionPool {
    probe: Tensor,
    q: Linear,
    kv: Linear,
    out_proj: Linear,
    layernorm: LayerNorm,
    mlp: Mlp,
    num_heads: usize,
}

impl AttentionPool {
    /// Loads `probe`, `attention.in_proj_{weight,bias}`, `attention.out_proj`,
    /// `layernorm` and `mlp` under the head's prefix.
    pub fn load(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        let h = s.hidden;
        let attention = vb.pp("attention");
        let w = attention.get((3 * h, h), "in_proj_weight")?;
        let b = attention.get(3 * h, "in_proj_bias")?;
        Ok(Self {
            probe: vb.get((1, 1, h), "probe")?.reshape((1, h))?,
            q: Linear::new(w.narrow(0, 0, h)?, Some(b.narrow(0, 0, h)?))?,
            kv: Linear::new(w.narrow(0, h, 2 * h)?, Some(b.narrow(0, h, 2 * h)?))?,
            out_proj: Linear::load(attention.pp("out_proj"), h, h, true)?,
            layernorm: LayerNorm::load(vb.pp("layernorm"), h, s.eps)?,
            mlp: Mlp::load(vb.pp("mlp"), h, s.intermediate, s.activation)?,
            num_heads: s.heads,
        })
    }

    /// (batch, seq, hidden) states to (batch, hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let (heads, d) = (self.num_heads, h / self.num_heads);
        // The query is the same for every image: (heads, d, 1), scaled.
        let q = (self.q.forward(&self.probe)?.reshape((heads, d, 1))? * (d as f64).powf(-0.5))?;
        let kv = self
            .kv
            .forward(x)?
            .reshape((b, n, 2, heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        let k = kv.get(0)?.contiguous()?; // (b, heads, n, d)
        let v = kv.get(1)?.contiguous()?;
        let q = q
            .unsqueeze(0)?
            .broadcast_as((b, heads, d, 1))?
            .contiguous()?;
        // Scores over positions, as a row per head: (b, heads, 1, n).
        let scores = k.matmul(&q)?.transpose(2, 3)?;
        let p = softmax_last(&scores)?;
        let out = p.matmul(&v)?.reshape((b, h))?;
        let out = self.out_proj.forward(&out)?;
        let mlp = self.mlp.forward(&self.layernorm.forward(&out)?)?;
        Ok((out + mlp)?)
    }

    /// The head's keys and values of every position in `precision` (a
    /// product as large as an encoder layer's). The rest is one row per
    /// image and stays f32.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        self.kv.reduce_to(LayerKind::Qkv, precision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::Pointwise;
    use crate::model::test_support::{max_abs_diff, random};

    #[test]
    fn layers_converted_on_load_skip_the_f32_packing_and_keep_its_results() {
        let (w, b) = (random(&[40, 96], 1), random(&[40], 2));
        let x = random(&[7, 96], 3);
        let made = |kind: LayerKind| {
            let load = || Linear::new(w.clone(), Some(b.clone()));
            let reduce = |l: &mut Linear, p| l.reduce_to(kind, p);
            crate::model::bf16::converting_on_load(Precision::Fast, || {
                converted_on_load(load, reduce)
            })
            .unwrap()
        };
        // Loaded as read, then converted: what converting a packed layer
        // gives, to the bit.
        let mut after = Linear::new(w.clone(), Some(b.clone())).unwrap();
        after.reduce_to(LayerKind::MlpUp, Precision::Fast).unwrap();
        let on_load = made(LayerKind::MlpUp);
        let got = on_load.forward(&x).unwrap();
        assert_eq!(max_abs_diff(&got, &after.forward(&x).unwrap()), 0.0);
        // A kind that stays f32 ends packed as a plain load packs it.
        let kept = made(LayerKind::Projection);
        let plain = Linear::new(w.clone(), Some(b.clone())).unwrap();
        assert_eq!(
            matches!(kept.weight, Weight::Prepacked(_)),
            matches!(plain.weight, Weight::Prepacked(_))
        );
        let got = kept.forward(&x).unwrap();
        assert_eq!(max_abs_diff(&got, &plain.forward(&x).unwrap()), 0.0);
        // Outside such a load, nothing is left unpacked.
        assert!(!PACK_LATER.get());
    }

    /// An encoder's output at one position of each sequence is the whole
    /// output's row there, in inference (the last layer computes only those
    /// rows) and in a training graph, with and without a causal mask, in
    /// f32 and converted to bf16.
    #[test]
    fn pooled_rows_are_those_of_the_whole_encoder() {
        let device = candle_core::Device::Cpu;
        let shape = EncoderShape {
            hidden: 32,
            intermediate: 64,
            heads: 4,
            layers: 2,
            activation: Activation::Gelu,
            eps: 1e-5,
        };
        let varmap = candle_nn::VarMap::new();
        let training = Encoder::load(
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
            &shape,
        )
        .unwrap();
        let mut tensors = std::collections::HashMap::new();
        for (seed, (name, var)) in varmap.data().lock().unwrap().iter().enumerate() {
            var.set(&random(var.dims(), 100 + seed as u64)).unwrap();
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let exact = Encoder::load(vb.clone(), &shape).unwrap();
        let mut fast = Encoder::load(vb, &shape).unwrap();
        fast.reduce_to(Precision::Fast).unwrap();
        let x = random(&[3, 9, 32], 7);
        let causal = causal_mask(9, &device).unwrap();
        let rows = [8, 0, 4];
        for mask in [None, Some(&causal)] {
            for encoder in [&exact, &fast] {
                let whole = encoder.forward(&x, mask).unwrap();
                let want = crate::model::ops::select_rows(&whole, &rows).unwrap();
                let got = encoder.forward_rows(&x, mask, &rows).unwrap();
                assert_eq!(got.dims(), [3, 32]);
                assert!(
                    max_abs_diff(&got, &want) < 1e-5,
                    "{}",
                    max_abs_diff(&got, &want)
                );
            }
            // A training graph: the same rows, and gradients through them.
            let x = candle_core::Var::from_tensor(&x).unwrap();
            let got = training.forward_rows(&x, mask, &rows).unwrap();
            let whole = training.forward(&x, mask).unwrap();
            let want = crate::model::ops::select_rows(&whole, &rows).unwrap();
            assert_eq!(max_abs_diff(&got, &want), 0.0);
            let grads = got.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(&x).is_some());
            assert!(varmap.all_vars().iter().all(|v| grads.get(v).is_some()));
        }
    }

    /// A bf16 layer computes the same on AMX, in the AVX2 kernel's bf16
    /// panels and in f32 with rounded weights (weights rounded alike; only
    /// AMX rounds the input too), gives back its rounded weight, and passes
    /// gradients to a trainable input.
    #[test]
    fn bf16_layers_agree_with_and_without_amx() {
        let (w, b) = (random(&[45, 70], 1), random(&[45], 2));
        let mut amx = Linear::new(w.clone(), Some(b.clone())).unwrap();
        amx.reduce_to(LayerKind::Qkv, Precision::Fast).unwrap();
        let mut panels = Linear::new(w.clone(), Some(b.clone())).unwrap();
        panels
            .reduce_to_with(LayerKind::Qkv, Precision::Fast, false)
            .unwrap();
        crate::model::gemm::set_enabled(false);
        let mut portable = Linear::new(w.clone(), Some(b.clone())).unwrap();
        let reduced = portable.reduce_to_with(LayerKind::Qkv, Precision::Fast, false);
        crate::model::gemm::set_enabled(true);
        reduced.unwrap();
        let exact = Linear::new(w.clone(), Some(b)).unwrap();
        assert!(matches!(&portable.weight, Weight::Plain(..)));
        if crate::model::bf16::available() {
            assert!(matches!(&amx.weight, Weight::Prepacked(p) if p.is_reduced()));
        }
        if crate::model::gemm::bf16_panels() {
            assert!(
                matches!(&panels.weight, Weight::Prepacked(p) if p.name() == "clipdex-bf16-panels")
            );
        }
        let rounded = w
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        for layer in [&amx, &panels, &portable] {
            assert_eq!(
                layer.weight().unwrap().to_vec2::<f32>().unwrap(),
                rounded.to_vec2::<f32>().unwrap()
            );
        }
        let x = random(&[3, 17, 70], 3);
        for f in [Pointwise::Identity, Pointwise::QuickGelu] {
            let (a, p) = (
                amx.forward_then(&x, f).unwrap(),
                portable.forward_then(&x, f).unwrap(),
            );
            // Inputs of about 1 over 70 terms: bf16's relative 2^-9 per input.
            let err = max_abs_diff(&a, &p);
            assert!(err < 0.1, "{f:?}: {err}");
            assert!(max_abs_diff(&p, &exact.forward_then(&x, f).unwrap()) > 1e-4);
            // The same rounded weights and f32 inputs: only the order of the
            // sums differs.
            let err = max_abs_diff(&panels.forward_then(&x, f).unwrap(), &p);
            assert!(err < 1e-4, "{f:?} panels: {err}");
        }
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let y = amx.forward(var.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dx = grads
            .get(var.as_tensor())
            .expect("the input has a gradient");
        let want = rounded.sum(0).unwrap().broadcast_as((3, 17, 70)).unwrap();
        assert!(max_abs_diff(&dx, &want) < 1e-4);
    }

    /// The packed kernel (where the CPU has it) and candle's product give one
    /// layer the same output, with every fused activation, and the packed
    /// layer gives its weight back exactly.
    #[test]
    fn packed_and_plain_layers_agree() {
        let (w, b) = (random(&[45, 70], 1), random(&[45], 2));
        let packed = Linear::new(w.clone(), Some(b.clone())).unwrap();
        crate::model::gemm::set_enabled(false);
        let plain = Linear::new(w.clone(), Some(b));
        crate::model::gemm::set_enabled(true);
        let plain = plain.unwrap();
        assert!(matches!(plain.weight, Weight::Plain(..)));
        if crate::model::gemm::available() {
            assert!(matches!(&packed.weight, Weight::Prepacked(p) if !p.is_reduced()));
        }
        assert_eq!(
            packed.weight().unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        assert_eq!(packed.out_dim().unwrap(), 45);
        let x = random(&[3, 17, 70], 3);
        // A frozen packed layer fed by a trainable one: candle's product, so
        // the input gets its gradient.
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let y = packed.forward(var.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dx = grads
            .get(var.as_tensor())
            .expect("the input has a gradient");
        let want = w.sum(0).unwrap().broadcast_as((3, 17, 70)).unwrap();
        let err = max_abs_diff(&dx, &want);
        assert!(err < 1e-4, "gradient: {err}");
        let err = max_abs_diff(&y, &plain.forward(&x).unwrap());
        assert!(err < 1e-4, "graph forward: {err}");
        for f in [
            Pointwise::Identity,
            Pointwise::GeluTanh,
            Pointwise::GeluErf,
            Pointwise::QuickGelu,
            Pointwise::Relu,
        ] {
            let (a, p) = (
                packed.forward_then(&x, f).unwrap(),
                plain.forward_then(&x, f).unwrap(),
            );
            assert_eq!(a.dims(), &[3, 17, 45]);
            let err = max_abs_diff(&a, &p);
            assert!(err < 1e-4, "{f:?}: {err}");
        }
    }
}
