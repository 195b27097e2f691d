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

/// Checks a reduced-precision dense layer against `reference` (the product
/// of the inputs as the kernel rounds them, with the bias) on shapes that
/// fill whole 32 x 32 blocks, leave some over, or are smaller than one
/// tile, with enough rows for several tasks; and with a ReLU after it.
pub fn check_reduced_products(
    dense: impl Fn(&Tensor, &Tensor, &Tensor, crate::model::ops::Pointwise) -> Tensor,
    reference: impl Fn(&[f32], &[f32], usize, usize, usize, &[f32]) -> Vec<f32>,
) {
    use crate::model::ops::Pointwise;
    for (m, n, k) in [
        (1, 1, 1),
        (10, 512, 512),
        (32, 32, 64),
        (50, 768, 768),
        (34, 48, 100),
        (77, 40, 33),
        (300, 96, 200),
        // Activation rows 4 and 8 KB long: laid out a line apart more.
        (12, 32, 2048),
        (13, 40, 4096),
    ] {
        let (x, w, b) = (random(&[m, k], 1), random(&[n, k], 2), random(&[n], 5));
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&values(&x), &values(&w), m, n, k, &values(&b));
        let want = Tensor::from_vec(want, (m, n), &candle_core::Device::Cpu).unwrap();
        let got = dense(&x, &w, &b, Pointwise::Identity);
        // Sums in f32 (bf16) or exact but scaled (int8): rounding only.
        let tol = 1e-5 * (k as f32).sqrt() * 4.0;
        let diff = max_abs_diff(&got, &want);
        assert!(diff < tol, "{m} x {n} x {k}: {diff}");
        let relu = dense(&x, &w, &b, Pointwise::Relu);
        assert!(max_abs_diff(&relu, &want.relu().unwrap()) < tol);
    }
}
