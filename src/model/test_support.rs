//! Helpers for the unit tests of `model`.

use candle_core::{Device, Tensor};

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tensor of standard normal values, the same for the same seed.
pub fn random(dims: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::model::init::NormalRng::new(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}
