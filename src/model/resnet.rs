//! The CLIP paper's modified ResNet image tower, as open_clip's
//! `ModifiedResNet` (`modified_resnet.py`) lays it out.
//!
//! Three changes to ResNet-D (Radford et al. 2021, section 2.4): a stem of
//! three 3x3 convolutions with an average pool in place of the max pool;
//! strided blocks that downsample by average pooling before the convolution
//! (anti-aliasing, Zhang 2019), on the residual path too; and attention
//! pooling in place of global average pooling, one query at the mean of the
//! positions attending over all of them.
//!
//! Batch normalisation runs in inference mode, so each is folded into the
//! convolution before it at load time: `w' = w * g / sqrt(var + eps)`,
//! `b' = beta - mean * g / sqrt(var + eps)`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::Precision;
use super::gemm::{Prepacked, RowSource};
use super::ops::Pointwise;

use super::config::{ResNetConfig, VisionConfig};
use super::layers::{Linear, softmax_last};
use super::winograd::Winograd;
use super::{Error, Result};

/// `torch.nn.BatchNorm2d`'s default epsilon.
const BN_EPS: f64 = 1e-5;

/// Activations channels last: `data` is (n * h * w, c), one row per
/// position, so a 1x1 convolution is one matrix product and a 3x3 one a
/// product over gathered patches (gemm is fastest on one big matrix).
#[derive(Clone, Debug)]
struct Map {
    data: Tensor,
    n: usize,
    h: usize,
    w: usize,
}

/// A 3x3 convolution's Winograd weights and its bias.
type WinogradLayer = (Arc<Winograd>, Option<Vec<f32>>);

/// A bias-free convolution followed by batch normalisation, folded into one
/// dense layer over (ky, kx, channel) patches.
#[derive(Clone, Debug)]
struct ConvBn {
    dense: Linear,
    k: usize,
    stride: usize,
    /// The f32 3x3 convolution's Winograd weights, made at first use (none
    /// where it is another shape or the CPU has no packed kernel).
    winograd: OnceLock<Option<Arc<Winograd>>>,
}

/// A convolution with its batch normalisation, as one of the two towers
/// holds it: they share the tower's shape and loading.
trait Conv: Sized {
    /// Loads `conv` (weights only) and `bn` (gain, bias, running statistics)
    /// of a `k` x `k` convolution from `cin` to `cout` channels.
    fn load(
        conv: VarBuilder,
        bn: VarBuilder,
        shape: (usize, usize, usize),
        stride: usize,
    ) -> Result<Self>;
}

impl Conv for ConvBn {
    fn load(
        conv: VarBuilder,
        bn: VarBuilder,
        (cin, cout, k): (usize, usize, usize),
        stride: usize,
    ) -> Result<Self> {
        let w = conv.get((cout, cin, k, k), "weight")?;
        let gamma = bn.get(cout, "weight")?;
        let beta = bn.get(cout, "bias")?;
        let mean = bn.get(cout, "running_mean")?;
        let var = bn.get(cout, "running_var")?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let w = w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        // (out, in, ky, kx) to (out, ky * kx * in): the patch layout of `Im2Col`.
        let w = w
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((cout, k * k * cin))?;
        Ok(Self {
            dense: Linear::new(w, Some(bias))?,
            k,
            stride,
            winograd: OnceLock::new(),
        })
    }
}

impl ConvBn {
    /// The convolution (padding `k / 2`), then `f`.
    fn forward(&self, x: &Map, f: Pointwise) -> Result<Map> {
        match self.winograd(x)? {
            Some((weights, bias)) => Ok(Map {
                data: super::winograd::conv(&x.data, weights, (x.n, x.h, x.w), bias, f)?,
                ..x.clone()
            }),
            None => self.direct(x, f),
        }
    }

    /// The Winograd form of the layer and its bias, where it applies: an
    /// f32 3x3 convolution of stride 1 for inference.
    fn winograd(&self, x: &Map) -> Result<Option<WinogradLayer>> {
        if (self.k, self.stride) != (3, 1) || x.data.track_op() {
            return Ok(None);
        }
        let Some((weight, bias)) = self.dense.prepacked()? else {
            return Ok(None);
        };
        if weight.is_reduced() {
            return Ok(None);
        }
        if self.winograd.get().is_none() {
            let (cout, k) = weight.dims();
            let w = weight.unpack()?.flatten_all()?.to_vec1::<f32>()?;
            let made = Winograd::new(&w, cout, k / 9)?.map(Arc::new);
            // Another thread may have made it meanwhile: the same weights.
            let _ = self.winograd.set(made);
        }
        Ok(self.winograd.get().cloned().flatten().map(|w| (w, bias)))
    }

    /// The convolution as a product over its patches.
    fn direct(&self, x: &Map, f: Pointwise) -> Result<Map> {
        let (k, s, p) = (self.k, self.stride, self.k / 2);
        let (h, w) = ((x.h + 2 * p - k) / s + 1, (x.w + 2 * p - k) / s + 1);
        let shape = Im2Col {
            n: x.n,
            h: x.h,
            w: x.w,
            k,
            stride: s,
        };
        let data = if k == 1 && s == 1 {
            self.dense.forward_then(&x.data, f)?
        } else {
            match self.dense.prepacked()? {
                // Inference: the layer's kernel makes each patch as it packs
                // or converts its input.
                Some((weight, bias)) if !x.data.track_op() => {
                    x.data.contiguous()?.apply_op1_no_bwd(&PatchDense {
                        shape,
                        weight,
                        bias,
                        f,
                    })?
                }
                _ => {
                    let patches = x.data.apply_op1_no_bwd(&shape)?;
                    self.dense.forward_then(&patches, f)?
                }
            }
        };
        Ok(Map { data, n: x.n, h, w })
    }
}

/// Gathers every k x k patch (stride `stride`, zero padding `k / 2`) of a
/// channels-last map into one row: (n * h' * w', k * k * c).
struct Im2Col {
    n: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
}

impl Im2Col {
    /// The patches of the map `x` (channels last, this shape), as rows.
    fn of<'a>(&self, x: &'a [f32]) -> Patches<'a> {
        let Self { n, h, w, k, stride } = *self;
        let p = k / 2;
        Patches {
            x,
            h,
            w,
            c: x.len() / (n * h * w),
            k,
            stride,
            out: (
                n,
                (h + 2 * p - k) / stride + 1,
                (w + 2 * p - k) / stride + 1,
            ),
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "clipdex-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let patches = self.of(super::ops::slice(storage, layout, self.name())?);
        let shape = Shape::from((patches.count(), patches.width()));
        Ok((CpuStorage::F32(patches.gather()), shape))
    }
}

/// A map's k x k patches, one row each, made on demand.
struct Patches<'a> {
    x: &'a [f32],
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    stride: usize,
    /// Images, rows and columns of the output.
    out: (usize, usize, usize),
}

impl RowSource for Patches<'_> {
    fn count(&self) -> usize {
        self.out.0 * self.out.1 * self.out.2
    }

    fn width(&self) -> usize {
        self.k * self.k * self.c
    }

    fn write(&self, r: usize, dst: &mut [f32]) {
        let Self {
            h, w, c, k, stride, ..
        } = *self;
        let (_, oh, ow) = self.out;
        let (img, oy, ox) = (r / (oh * ow), r / ow % oh, r % ow);
        let p = k / 2;
        let inside = |v: usize, end: usize| (p..end + p).contains(&v).then(|| v - p);
        for ky in 0..k {
            for kx in 0..k {
                let dst = &mut dst[(ky * k + kx) * c..][..c];
                match (inside(oy * stride + ky, h), inside(ox * stride + kx, w)) {
                    (Some(y), Some(x)) => {
                        let src = ((img * h + y) * w + x) * c;
                        dst.copy_from_slice(&self.x[src..src + c]);
                    }
                    // The zero padding.
                    _ => dst.fill(0.0),
                }
            }
        }
    }
}

/// A convolution's dense layer over its patches, for inference: each patch
/// is made as the layer's kernel converts its input rows, so the patches
/// (k x k times the map) are never all in memory.
struct PatchDense {
    shape: Im2Col,
    weight: Arc<dyn Prepacked>,
    bias: Option<Vec<f32>>,
    f: Pointwise,
}

impl CustomOp1 for PatchDense {
    fn name(&self) -> &'static str {
        "clipdex-patch-dense"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let patches = self
            .shape
            .of(super::ops::slice(storage, layout, self.name())?);
        let (n, k) = self.weight.dims();
        if patches.width() != k {
            candle_core::bail!(
                "{}: patches of {} values, the weight takes {k}",
                self.name(),
                patches.width()
            );
        }
        let y = self
            .weight
            .product_of(&patches, self.bias.as_deref(), self.f);
        Ok((CpuStorage::F32(y), Shape::from((patches.count(), n))))
    }
}

/// `nn.AvgPool2d(k)` (stride k, no padding) over a channels-last map.
struct AvgPool {
    n: usize,
    h: usize,
    w: usize,
    k: usize,
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "clipdex-avg-pool"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::slice(storage, layout, self.name())?;
        let Self { n, h, w, k } = *self;
        let c = x.len() / (n * h * w);
        let (oh, ow) = (h / k, w / k);
        let scale = 1.0 / (k * k) as f32;
        let mut out = vec![0f32; n * oh * ow * c];
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(line, out)| {
                let (img, oy) = (line / oh, line % oh);
                for ox in 0..ow {
                    let dst = &mut out[ox * c..(ox + 1) * c];
                    for ky in 0..k {
                        for kx in 0..k {
                            let src = ((img * h + oy * k + ky) * w + ox * k + kx) * c;
                            for (d, &v) in dst.iter_mut().zip(&x[src..src + c]) {
                                *d += v;
                            }
                        }
                    }
                    dst.iter_mut().for_each(|d| *d *= scale);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n * oh * ow, c))))
    }
}

/// `nn.AvgPool2d(k)`; the identity for k = 1.
fn pool(x: &Map, k: usize) -> Result<Map> {
    if k == 1 {
        return Ok(x.clone());
    }
    Ok(Map {
        data: x.data.apply_op1_no_bwd(&AvgPool {
            n: x.n,
            h: x.h,
            w: x.w,
            k,
        })?,
        n: x.n,
        h: x.h / k,
        w: x.w / k,
    })
}

/// open_clip's `Bottleneck`: 1x1, 3x3, (average pool), 1x1 with four times
/// the planes; the residual path average-pools and projects when the shape
/// changes.
#[derive(Clone, Debug)]
struct Bottleneck<C> {
    conv1: C,
    conv2: C,
    conv3: C,
    stride: usize,
    downsample: Option<C>,
}

impl<C: Conv> Bottleneck<C> {
    fn load(vb: VarBuilder, inplanes: usize, planes: usize, stride: usize) -> Result<Self> {
        let out = planes * 4;
        Ok(Self {
            conv1: C::load(vb.pp("conv1"), vb.pp("bn1"), (inplanes, planes, 1), 1)?,
            conv2: C::load(vb.pp("conv2"), vb.pp("bn2"), (planes, planes, 3), 1)?,
            conv3: C::load(vb.pp("conv3"), vb.pp("bn3"), (planes, out, 1), 1)?,
            stride,
            downsample: if stride > 1 || inplanes != out {
                let d = vb.pp("downsample");
                Some(C::load(d.pp("0"), d.pp("1"), (inplanes, out, 1), 1)?)
            } else {
                None
            },
        })
    }

    fn convs(&self) -> impl Iterator<Item = &C> {
        [&self.conv1, &self.conv2, &self.conv3]
            .into_iter()
            .chain(self.downsample.as_ref())
    }
}

/// The tower's layers, as open_clip builds them: a stem of three
/// convolutions (the first strided), then stages of bottlenecks whose first
/// block (after the first stage) downsamples, then attention pooling.
#[derive(Clone, Debug)]
struct Layers<C> {
    stem: [C; 3],
    stages: Vec<Vec<Bottleneck<C>>>,
    attnpool: AttentionPool2d,
    image_size: usize,
}

impl<C: Conv> Layers<C> {
    fn load(
        vb: VarBuilder,
        cfg: &VisionConfig,
        r: &ResNetConfig,
        output_dim: usize,
    ) -> Result<Self> {
        let w = r.width;
        let stem = [
            C::load(vb.pp("conv1"), vb.pp("bn1"), (3, w / 2, 3), 2)?,
            C::load(vb.pp("conv2"), vb.pp("bn2"), (w / 2, w / 2, 3), 1)?,
            C::load(vb.pp("conv3"), vb.pp("bn3"), (w / 2, w, 3), 1)?,
        ];
        let stages = blocks(r)
            .into_iter()
            .enumerate()
            .map(|(i, stage)| {
                let layer = vb.pp(format!("layer{}", i + 1));
                stage
                    .into_iter()
                    .enumerate()
                    .map(|(j, (inplanes, planes, stride))| {
                        Bottleneck::load(layer.pp(j), inplanes, planes, stride)
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            stem,
            stages,
            attnpool: AttentionPool2d::load(
                vb.pp("attnpool"),
                cfg.image_size / 32,
                w * 32,
                r.heads,
                output_dim,
            )?,
            image_size: cfg.image_size,
        })
    }

    fn check(&self, pixels: &Tensor) -> Result<()> {
        let (_, c, height, width) = pixels.dims4()?;
        if height != self.image_size || width != self.image_size || c != 3 {
            return Err(Error::Input(format!(
                "pixel batch is {c}x{height}x{width}, the model takes 3x{s}x{s}",
                s = self.image_size
            )));
        }
        Ok(())
    }
}

/// Each stage's bottlenecks as (input channels, planes, stride).
pub fn blocks(r: &ResNetConfig) -> Vec<Vec<(usize, usize, usize)>> {
    let mut inplanes = r.width;
    r.layers
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let planes = r.width << i;
            (0..n)
                .map(|j| {
                    let block = (inplanes, planes, if i > 0 && j == 0 { 2 } else { 1 });
                    inplanes = planes * 4;
                    block
                })
                .collect()
        })
        .collect()
}

impl Bottleneck<ConvBn> {
    fn forward(&self, x: &Map) -> Result<Map> {
        let out = self.conv1.forward(x, Pointwise::Relu)?;
        let out = self.conv2.forward(&out, Pointwise::Relu)?;
        let out = pool(&out, self.stride)?;
        let out = self.conv3.forward(&out, Pointwise::Identity)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(&pool(x, self.stride)?, Pointwise::Identity)?.data,
            None => x.data.clone(),
        };
        // The product is a fresh buffer: the residual and ReLU go in place.
        super::ops::add_in_place(&out.data, &identity)?;
        let c = out.data.dim(1)?;
        super::ops::bias_in_place(
            &out.data,
            &Tensor::zeros(c, DType::F32, out.data.device())?,
            Pointwise::Relu,
        )?;
        Ok(out)
    }
}

/// open_clip's `AttentionPool2d`: the mean of the positions is prepended,
/// position embeddings added, and that first token's query attends over all
/// of them; `c_proj` maps into the embedding space.
#[derive(Clone, Debug)]
struct AttentionPool2d {
    positional_embedding: Tensor,
    q: Linear,
    /// k and v stacked: one matrix multiply.
    kv: Linear,
    c_proj: Linear,
    heads: usize,
}

impl AttentionPool2d {
    fn load(vb: VarBuilder, grid: usize, embed: usize, heads: usize, out: usize) -> Result<Self> {
        let k = Linear::load(vb.pp("k_proj"), embed, embed, true)?;
        let v = Linear::load(vb.pp("v_proj"), embed, embed, true)?;
        let (kb, vb_) = (
            k.bias()
                .ok_or_else(|| Error::Weights("k_proj has no bias".into()))?,
            v.bias()
                .ok_or_else(|| Error::Weights("v_proj has no bias".into()))?,
        );
        let kv = Linear::new(
            Tensor::cat(&[&k.weight()?, &v.weight()?], 0)?,
            Some(Tensor::cat(&[kb, vb_], 0)?),
        )?;
        Ok(Self {
            positional_embedding: vb.get((grid * grid + 1, embed), "positional_embedding")?,
            q: Linear::load(vb.pp("q_proj"), embed, embed, true)?,
            kv,
            c_proj: Linear::load(vb.pp("c_proj"), embed, out, true)?,
            heads,
        })
    }

    /// (batch, positions, channels) tokens to (batch, out).
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, hw, c) = tokens.dims3()?;
        let (heads, d) = (self.heads, c / self.heads);
        let x = Tensor::cat(&[&tokens.mean_keepdim(1)?, tokens], 1)?;
        let x = x.broadcast_add(&self.positional_embedding)?;
        let n = hw + 1;
        let q = (self
            .q
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)?
            * (d as f64).powf(-0.5))?
        .reshape((b, heads, 1, d))?;
        let kv = self
            .kv
            .forward(&x)?
            .reshape((b, n, 2, heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        let k = kv.get(0)?.contiguous()?; // (b, heads, n, d)
        let v = kv.get(1)?.contiguous()?;
        let scores = q.contiguous()?.matmul(&k.t()?)?; // (b, heads, 1, n)
        let p = softmax_last(&scores)?;
        let out = p.matmul(&v)?.reshape((b, c))?;
        self.c_proj.forward(&out)
    }
}

/// The whole tower for inference: stem, four stages, attention pooling.
#[derive(Clone, Debug)]
pub struct ModifiedResNet(Layers<ConvBn>);

impl ModifiedResNet {
    /// Loads open_clip's `visual.` weights (under whatever prefix `vb` has);
    /// `output_dim` is the embedding size.
    pub fn load(
        vb: VarBuilder,
        cfg: &VisionConfig,
        r: &ResNetConfig,
        output_dim: usize,
    ) -> Result<Self> {
        Ok(Self(Layers::load(vb, cfg, r, output_dim)?))
    }

    /// The stem's second and third convolutions, the stages' convolutions
    /// and the attention pooling's keys and values (every position's:
    /// RN50's 50 x 2048 x 4096, a tenth of the tower's multiply-adds) in
    /// reduced precision ([`Linear::reduce_to`]); the stem's first
    /// convolution, which sees the pixels, and the pooling's one-row query
    /// and output projection stay f32.
    pub fn reduce_to(&mut self, precision: Precision) -> Result<()> {
        let t = &mut self.0;
        let stages = t.stages.iter_mut().flatten().flat_map(|block| {
            [&mut block.conv1, &mut block.conv2, &mut block.conv3]
                .into_iter()
                .chain(block.downsample.as_mut())
        });
        for conv in t.stem.iter_mut().skip(1).chain(stages) {
            conv.dense
                .reduce_to(super::bf16::LayerKind::Conv, precision)?;
            conv.winograd = OnceLock::new();
        }
        t.attnpool
            .kv
            .reduce_to(super::bf16::LayerKind::Qkv, precision)
    }

    /// (batch, 3, size, size) pixels to (batch, output_dim) features.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let t = &self.0;
        t.check(pixels)?;
        let (n, s) = (pixels.dim(0)?, t.image_size);
        let data = pixels
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((n * s * s, 3))?;
        let mut x = Map {
            data,
            n,
            h: s,
            w: s,
        };
        for conv in &t.stem {
            x = conv.forward(&x, Pointwise::Relu)?;
        }
        x = pool(&x, 2)?;
        for block in t.stages.iter().flatten() {
            x = block.forward(&x)?;
        }
        let c = x.data.dim(1)?;
        t.attnpool.forward(&x.data.reshape((n, x.h * x.w, c))?)
    }
}

/// Trainable weights of a convolution and its batch normalisation, with the
/// running statistics batch normalisation keeps for inference.
#[derive(Clone, Debug)]
struct TrainConvBn {
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Var,
    running_var: Var,
    /// Where the statistics are saved (`...bn1`).
    bn_name: String,
    stride: usize,
    padding: usize,
}

/// `torch.nn.BatchNorm2d`'s default momentum.
const BN_MOMENTUM: f64 = 0.1;

impl Conv for TrainConvBn {
    fn load(
        conv: VarBuilder,
        bn: VarBuilder,
        (cin, cout, k): (usize, usize, usize),
        stride: usize,
    ) -> Result<Self> {
        // The statistics are buffers, never optimised: served as plain tensors, kept here as variables to update.
        let stat =
            |name: &str| -> Result<Var> { Ok(Var::from_tensor(&bn.get(cout, name)?.detach())?) };
        Ok(Self {
            weight: conv.get((cout, cin, k, k), "weight")?,
            gamma: bn.get(cout, "weight")?,
            beta: bn.get(cout, "bias")?,
            running_mean: stat("running_mean")?,
            running_var: stat("running_var")?,
            bn_name: bn.prefix(),
            stride,
            padding: k / 2,
        })
    }
}

impl TrainConvBn {
    /// Convolution then batch normalisation: over the batch's statistics
    /// (updating the running ones) when training, over the running ones otherwise.
    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        let (n, c, h, w) = y.dims4()?;
        let shape = (1, c, 1, 1);
        let (mean, var) = if training {
            let flat = y.transpose(0, 1)?.contiguous()?.reshape((c, n * h * w))?;
            let mean = flat.mean_keepdim(1)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            // PyTorch keeps the unbiased variance.
            let count = (n * h * w) as f64;
            let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?;
            let m = BN_MOMENTUM;
            self.running_mean.set(
                &((self.running_mean.as_tensor() * (1.0 - m))?
                    + (mean.detach().flatten_all()? * m)?)?,
            )?;
            self.running_var.set(
                &((self.running_var.as_tensor() * (1.0 - m))? + (unbiased.flatten_all()? * m)?)?,
            )?;
            (mean.reshape(shape)?, var.reshape(shape)?)
        } else {
            (
                self.running_mean.as_tensor().detach().reshape(shape)?,
                self.running_var.as_tensor().detach().reshape(shape)?,
            )
        };
        let norm = y
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        Ok(norm
            .broadcast_mul(&self.gamma.reshape(shape)?)?
            .broadcast_add(&self.beta.reshape(shape)?)?)
    }

    fn buffers(&self, out: &mut Vec<(String, Var)>) {
        out.push((
            format!("{}.running_mean", self.bn_name),
            self.running_mean.clone(),
        ));
        out.push((
            format!("{}.running_var", self.bn_name),
            self.running_var.clone(),
        ));
    }
}

impl Bottleneck<TrainConvBn> {
    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let pool = |t: Tensor| -> Result<Tensor> {
            Ok(if self.stride > 1 {
                t.avg_pool2d(self.stride)?
            } else {
                t
            })
        };
        let out = self.conv1.forward(x, training)?.relu()?;
        let out = pool(self.conv2.forward(&out, training)?.relu()?)?;
        let out = self.conv3.forward(&out, training)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(&pool(x.clone())?, training)?,
            None => x.clone(),
        };
        Ok((out + identity)?.relu()?)
    }
}

/// The modified ResNet for training: channels first through candle's
/// differentiable convolutions and pools, batch normalisation over the
/// batch (`set_training(true)`, the default) or the running statistics.
#[derive(Clone, Debug)]
pub struct TrainableResNet {
    layers: Layers<TrainConvBn>,
    training: Arc<AtomicBool>,
}

impl TrainableResNet {
    pub fn load(
        vb: VarBuilder,
        cfg: &VisionConfig,
        r: &ResNetConfig,
        output_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            layers: Layers::load(vb, cfg, r, output_dim)?,
            training: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Batch statistics (training) or running ones (evaluation).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let t = &self.layers;
        t.check(pixels)?;
        let n = pixels.dim(0)?;
        let training = self.training.load(Ordering::Relaxed);
        let mut x = pixels.clone();
        for conv in &t.stem {
            x = conv.forward(&x, training)?.relu()?;
        }
        x = x.avg_pool2d(2)?;
        for block in t.stages.iter().flatten() {
            x = block.forward(&x, training)?;
        }
        let (_, c, h, w) = x.dims4()?;
        let tokens = x.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?;
        t.attnpool.forward(&tokens)
    }

    /// The running statistics by checkpoint name, to save with the weights
    /// (and to restore when a run resumes).
    pub fn buffers(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let t = &self.layers;
        let convs = t
            .stem
            .iter()
            .chain(t.stages.iter().flatten().flat_map(Bottleneck::convs));
        for conv in convs {
            conv.buffers(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::model::test_support::max_abs_diff as max_diff;

    #[test]
    fn channels_last_convolution_with_folded_batch_norm_is_conv2d_then_normalisation() {
        let dev = Device::Cpu;
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &dev).unwrap();
        let mut map = std::collections::HashMap::new();
        map.insert(
            "c.weight".to_string(),
            t(
                (0..2 * 3 * 9).map(|i| (i as f32 * 0.37).sin()).collect(),
                &[2, 3, 3, 3],
            ),
        );
        map.insert("b.weight".to_string(), t(vec![1.5, 0.5], &[2]));
        map.insert("b.bias".to_string(), t(vec![0.1, -0.2], &[2]));
        map.insert("b.running_mean".to_string(), t(vec![0.3, -0.4], &[2]));
        map.insert("b.running_var".to_string(), t(vec![2.0, 0.25], &[2]));
        let vb = VarBuilder::from_tensors(map.clone(), DType::F32, &dev);
        let bn = |y: &Tensor| {
            let p = |k: &str| map[k].reshape((1, 2, 1, 1)).unwrap();
            let sd = (p("b.running_var") + BN_EPS).unwrap().sqrt().unwrap();
            y.broadcast_sub(&p("b.running_mean"))
                .unwrap()
                .broadcast_div(&sd)
                .unwrap()
                .broadcast_mul(&p("b.weight"))
                .unwrap()
                .broadcast_add(&p("b.bias"))
                .unwrap()
        };
        let x = t(
            (0..2 * 3 * 25).map(|i| (i as f32 * 0.11).cos()).collect(),
            &[2, 3, 5, 5],
        );
        let nhwc = Map {
            data: x
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((50, 3))
                .unwrap(),
            n: 2,
            h: 5,
            w: 5,
        };
        for stride in [1, 2] {
            let conv = ConvBn::load(vb.pp("c"), vb.pp("b"), (3, 2, 3), stride).unwrap();
            let got = conv.forward(&nhwc, Pointwise::Identity).unwrap();
            let got = got
                .data
                .reshape((2, got.h, got.w, 2))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            let want = bn(&x.conv2d(&map["c.weight"], 1, stride, 1, 1).unwrap());
            assert!(max_diff(&got, &want) < 1e-5, "stride {stride}");
        }
        // Average pooling, channels last, against candle's NCHW one.
        let got = pool(&nhwc, 2).unwrap();
        let got = got
            .data
            .reshape((2, 2, 2, 3))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        assert!(max_diff(&got, &x.avg_pool2d(2).unwrap()) < 1e-6);
    }

    /// A convolution whose kernel makes each patch as it reads it gives
    /// exactly what it gives on the gathered patches, in every precision,
    /// on maps small enough for one thread and large enough for the pool.
    #[test]
    fn patches_made_by_the_kernel_give_the_products_of_gathered_ones() {
        use crate::model::bf16::LayerKind;
        use crate::model::test_support::random;
        let (cin, cout) = (64, 48);
        for precision in [Precision::Exact, Precision::Fast, Precision::Int8] {
            // 28 x 28 makes enough row blocks for the f32 kernel's tasks to
            // pack their own; the smaller maps pack once for all tasks.
            for (side, stride) in [(3, 1), (9, 1), (9, 2), (14, 1), (28, 1)] {
                let w = random(&[cout, 3 * 3 * cin], 1);
                let bias = random(&[cout], 2);
                let mut conv = ConvBn {
                    dense: Linear::new(w, Some(bias)).unwrap(),
                    k: 3,
                    stride,
                    winograd: OnceLock::new(),
                };
                if precision != Precision::Exact {
                    conv.dense.reduce_to(LayerKind::Conv, precision).unwrap();
                }
                let map = Map {
                    data: random(&[2 * side * side, cin], 3),
                    n: 2,
                    h: side,
                    w: side,
                };
                let got = conv.direct(&map, Pointwise::Relu).unwrap();
                let patches = map
                    .data
                    .apply_op1_no_bwd(&Im2Col {
                        n: 2,
                        h: side,
                        w: side,
                        k: 3,
                        stride,
                    })
                    .unwrap();
                let want = conv.dense.forward_then(&patches, Pointwise::Relu).unwrap();
                assert_eq!(got.data.dims(), want.dims());
                assert_eq!(
                    max_diff(&got.data, &want),
                    0.0,
                    "{precision:?}, {side} x {side}, stride {stride}"
                );
            }
        }
    }

    #[test]
    fn winograd_convolution_matches_the_product_over_patches() {
        use crate::model::test_support::random;
        let (cin, cout) = (40, 48);
        let w = random(&[cout, 3 * 3 * cin], 4);
        let bias = random(&[cout], 5);
        let conv = ConvBn {
            dense: Linear::new(w, Some(bias)).unwrap(),
            k: 3,
            stride: 1,
            winograd: OnceLock::new(),
        };
        // Odd and even sides, one that is a single pixel, non-square.
        for (n, h, w) in [(2, 7, 7), (1, 8, 6), (3, 1, 1), (1, 5, 12)] {
            let map = Map {
                data: random(&[n * h * w, cin], 6),
                n,
                h,
                w,
            };
            let Some(_) = conv.winograd(&map).unwrap() else {
                // No packed kernel on this CPU: the direct product runs.
                return;
            };
            for f in [Pointwise::Identity, Pointwise::Relu] {
                let got = conv.forward(&map, f).unwrap();
                let want = conv.direct(&map, f).unwrap();
                assert_eq!(got.data.dims(), want.data.dims());
                assert_eq!((got.n, got.h, got.w), (want.n, want.h, want.w));
                let scale = want.data.abs().unwrap().max_all().unwrap();
                let scale = scale.to_scalar::<f32>().unwrap();
                let diff = max_diff(&got.data, &want.data);
                assert!(
                    diff <= 2e-6 * scale,
                    "{n} x {h} x {w}, {f:?}: {diff} of {scale}"
                );
            }
        }
    }
}
