//! Fresh weights for a config, initialised as transformers'
//! `CLIPPreTrainedModel._init_weights` does, from a seed: the starting point
//! of training from scratch, and the random ViT-B/32 of the benchmarks.
//!
//! The generator is seeded SplitMix64 with Box-Muller normals, so the same
//! seed gives the same weights on every machine.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::{ClipConfig, Result};

pub use crate::common::rng::NormalRng;

/// A tensor of normal samples with standard deviation `std`.
fn normal_tensor(
    rng: &mut NormalRng,
    shape: &[usize],
    std: f64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Every tensor of a `CLIPModel` checkpoint for `config`, freshly initialised.
pub fn init_weights(
    config: &ClipConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = NormalRng::new(seed);
    let mut w = HashMap::new();
    let t = &config.text_config;
    let v = &config.vision_config;
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, device);
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, device);

    let layer_norm = |w: &mut HashMap<String, Tensor>, prefix: String, h: usize| -> Result<()> {
        w.insert(format!("{prefix}.weight"), ones(h)?);
        w.insert(format!("{prefix}.bias"), zeros(h)?);
        Ok(())
    };
    let encoder = |w: &mut HashMap<String, Tensor>,
                   rng: &mut NormalRng,
                   prefix: &str,
                   h: usize,
                   inter: usize,
                   layers: usize|
     -> Result<()> {
        let in_std = (h as f64).powf(-0.5) * ((2 * layers) as f64).powf(-0.5);
        let out_std = (h as f64).powf(-0.5);
        let fc_std = ((2 * h) as f64).powf(-0.5);
        for i in 0..layers {
            let p = format!("{prefix}.encoder.layers.{i}");
            for (name, std) in [
                ("q_proj", in_std),
                ("k_proj", in_std),
                ("v_proj", in_std),
                ("out_proj", out_std),
            ] {
                w.insert(
                    format!("{p}.self_attn.{name}.weight"),
                    normal_tensor(rng, &[h, h], std, device)?,
                );
                w.insert(format!("{p}.self_attn.{name}.bias"), zeros(h)?);
            }
            w.insert(
                format!("{p}.mlp.fc1.weight"),
                normal_tensor(rng, &[inter, h], fc_std, device)?,
            );
            w.insert(format!("{p}.mlp.fc1.bias"), zeros(inter)?);
            w.insert(
                format!("{p}.mlp.fc2.weight"),
                normal_tensor(rng, &[h, inter], in_std, device)?,
            );
            w.insert(format!("{p}.mlp.fc2.bias"), zeros(h)?);
            layer_norm(w, format!("{p}.layer_norm1"), h)?;
            layer_norm(w, format!("{p}.layer_norm2"), h)?;
        }
        Ok(())
    };

    let th = t.hidden_size;
    w.insert(
        "text_model.embeddings.token_embedding.weight".into(),
        normal_tensor(&mut rng, &[t.vocab_size, th], 0.02, device)?,
    );
    w.insert(
        "text_model.embeddings.position_embedding.weight".into(),
        normal_tensor(&mut rng, &[t.max_position_embeddings, th], 0.02, device)?,
    );
    encoder(
        &mut w,
        &mut rng,
        "text_model",
        th,
        t.intermediate_size,
        t.num_hidden_layers,
    )?;
    layer_norm(&mut w, "text_model.final_layer_norm".into(), th)?;

    let vh = v.hidden_size;
    match &v.resnet {
        Some(r) => resnet_weights(
            &mut w,
            &mut rng,
            v.image_size,
            r,
            config.projection_dim,
            device,
        )?,
        None => {
            let p = v.patch_size;
            w.insert(
                "vision_model.embeddings.class_embedding".into(),
                normal_tensor(&mut rng, &[vh], (vh as f64).powf(-0.5), device)?,
            );
            w.insert(
                "vision_model.embeddings.patch_embedding.weight".into(),
                normal_tensor(&mut rng, &[vh, v.num_channels, p, p], 0.02, device)?,
            );
            w.insert(
                "vision_model.embeddings.position_embedding.weight".into(),
                normal_tensor(&mut rng, &[v.num_positions(), vh], 0.02, device)?,
            );
            layer_norm(&mut w, "vision_model.pre_layrnorm".into(), vh)?;
            encoder(
                &mut w,
                &mut rng,
                "vision_model",
                vh,
                v.intermediate_size,
                v.num_hidden_layers,
            )?;
            layer_norm(&mut w, "vision_model.post_layernorm".into(), vh)?;
        }
    }

    w.insert(
        "text_projection.weight".into(),
        normal_tensor(
            &mut rng,
            &[config.projection_dim, th],
            (th as f64).powf(-0.5),
            device,
        )?,
    );
    // The ResNet's attention pooling projects into the embedding itself.
    if v.resnet.is_none() {
        w.insert(
            "visual_projection.weight".into(),
            normal_tensor(
                &mut rng,
                &[config.projection_dim, vh],
                (vh as f64).powf(-0.5),
                device,
            )?,
        );
    }
    w.insert(
        "logit_scale".into(),
        Tensor::new(config.logit_scale_init_value as f32, device)?,
    );
    Ok(w)
}

/// A tensor of uniform samples in (-bound, bound).
fn uniform_tensor(
    rng: &mut NormalRng,
    shape: &[usize],
    bound: f64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// The modified ResNet as open_clip initialises it: PyTorch's default
/// convolutions (uniform within 1/sqrt(fan_in)), batch normalisation at the
/// identity with the last one of each block at zero (each block starts as
/// its shortcut), the attention pooling's projections normal with std
/// 1/sqrt(width).
fn resnet_weights(
    w: &mut HashMap<String, Tensor>,
    rng: &mut NormalRng,
    image_size: usize,
    r: &super::ResNetConfig,
    output_dim: usize,
    device: &Device,
) -> Result<()> {
    let mut conv_bn = |w: &mut HashMap<String, Tensor>,
                       conv: &str,
                       bn: &str,
                       (cin, cout, k): (usize, usize, usize),
                       zero: bool|
     -> Result<()> {
        let bound = ((cin * k * k) as f64).powf(-0.5);
        w.insert(
            format!("{conv}.weight"),
            uniform_tensor(rng, &[cout, cin, k, k], bound, device)?,
        );
        let gamma = if zero {
            Tensor::zeros(cout, candle_core::DType::F32, device)?
        } else {
            Tensor::ones(cout, candle_core::DType::F32, device)?
        };
        w.insert(format!("{bn}.weight"), gamma);
        w.insert(
            format!("{bn}.bias"),
            Tensor::zeros(cout, candle_core::DType::F32, device)?,
        );
        w.insert(
            format!("{bn}.running_mean"),
            Tensor::zeros(cout, candle_core::DType::F32, device)?,
        );
        w.insert(
            format!("{bn}.running_var"),
            Tensor::ones(cout, candle_core::DType::F32, device)?,
        );
        Ok(())
    };
    let v = "vision_model";
    let width = r.width;
    conv_bn(
        w,
        &format!("{v}.conv1"),
        &format!("{v}.bn1"),
        (3, width / 2, 3),
        false,
    )?;
    conv_bn(
        w,
        &format!("{v}.conv2"),
        &format!("{v}.bn2"),
        (width / 2, width / 2, 3),
        false,
    )?;
    conv_bn(
        w,
        &format!("{v}.conv3"),
        &format!("{v}.bn3"),
        (width / 2, width, 3),
        false,
    )?;
    for (i, stage) in super::resnet::blocks(r).into_iter().enumerate() {
        for (j, (inplanes, planes, stride)) in stage.into_iter().enumerate() {
            let p = format!("{v}.layer{}.{j}", i + 1);
            conv_bn(
                w,
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                (inplanes, planes, 1),
                false,
            )?;
            conv_bn(
                w,
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                (planes, planes, 3),
                false,
            )?;
            conv_bn(
                w,
                &format!("{p}.conv3"),
                &format!("{p}.bn3"),
                (planes, planes * 4, 1),
                true,
            )?;
            if stride > 1 || inplanes != planes * 4 {
                conv_bn(
                    w,
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    (inplanes, planes * 4, 1),
                    false,
                )?;
            }
        }
    }
    let embed = width * 32;
    let grid = image_size / 32;
    let std = (embed as f64).powf(-0.5);
    let a = format!("{v}.attnpool");
    w.insert(
        format!("{a}.positional_embedding"),
        normal_tensor(rng, &[grid * grid + 1, embed], std, device)?,
    );
    for (name, out) in [
        ("q_proj", embed),
        ("k_proj", embed),
        ("v_proj", embed),
        ("c_proj", output_dim),
    ] {
        w.insert(
            format!("{a}.{name}.weight"),
            normal_tensor(rng, &[out, embed], std, device)?,
        );
        w.insert(
            format!("{a}.{name}.bias"),
            uniform_tensor(rng, &[out], std, device)?,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_are_standard_and_seeded() {
        let mut rng = NormalRng::new(7);
        let xs: Vec<f64> = (0..20_000).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        assert_eq!(NormalRng::new(7).normal(), xs[0]);
        assert_ne!(NormalRng::new(8).normal(), xs[0]);
    }

    #[test]
    fn initialised_weights_load_into_the_model() {
        let mut config = ClipConfig::vit_base_patch32();
        config.text_config.num_hidden_layers = 1;
        config.vision_config.num_hidden_layers = 1;
        config.text_config.vocab_size = 100;
        let weights = init_weights(&config, 1, &Device::Cpu).unwrap();
        // Scales as CLIPPreTrainedModel._init_weights sets them.
        let std = |name: &str| {
            let t = weights[name].flatten_all().unwrap();
            let v: Vec<f32> = t.to_vec1().unwrap();
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt() as f64
        };
        let th = config.text_config.hidden_size as f64;
        for (name, want) in [
            ("text_model.embeddings.token_embedding.weight", 0.02),
            ("text_projection.weight", th.powf(-0.5)),
            (
                "text_model.encoder.layers.0.mlp.fc1.weight",
                (2.0 * th).powf(-0.5),
            ),
        ] {
            let got = std(name);
            assert!(
                (got / want - 1.0).abs() < 0.05,
                "{name}: std {got}, want {want}"
            );
        }
        let vb =
            candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &Device::Cpu);
        let model = crate::model::ClipModel::new(vb, &config).unwrap();
        // And the model they make embeds: finite features of the right size.
        let ids = Tensor::new(&[[0u32, 5, 9, 99]], &Device::Cpu).unwrap();
        let text = model.get_text_features(&ids, &[3]).unwrap();
        assert_eq!(text.dims(), &[1, config.projection_dim]);
        let values: Vec<f32> = text.flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|v| *v != 0.0));
    }
}
