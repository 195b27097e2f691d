//! The graph's distance between unit vectors, `1 - a . b`, with the dot
//! product on AVX-512 or AVX2 where the CPU has them.
//!
//! anndists' `DistDot` (hnsw_rs's) sums in one register, so every addition
//! waits for the one before; at 512 dimensions that chain, not memory, set
//! the pace of a distance. Four independent sums of fused multiply-adds
//! remove it.

use std::sync::atomic::{AtomicU8, Ordering};

/// `1 - a . b`, never below 0 (rounding can take the dot product of a unit
/// vector with itself just above 1).
///
/// The name is hnsw_rs's: a saved graph records the last segment of its
/// distance's type name and is loaded only with a distance of that name, so
/// graphs saved with anndists' `DistDot` load with this one and the other
/// way round (the two differ only in rounding).
#[derive(Clone, Copy, Debug, Default)]
pub struct DistDot;

impl hnsw_rs::prelude::Distance<f32> for DistDot {
    #[inline]
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// Which kernel [`dot`] runs: 0 not yet chosen, then 1 portable, 2 AVX2
/// with FMA, 3 AVX-512.
static KERNEL: AtomicU8 = AtomicU8::new(0);

fn kernel() -> u8 {
    match KERNEL.load(Ordering::Relaxed) {
        0 => {
            let k = choose();
            KERNEL.store(k, Ordering::Relaxed);
            k
        }
        k => k,
    }
}

fn choose() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return 3;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return 2;
        }
    }
    1
}

/// The dot product of two vectors of the same length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors of one length");
    match kernel() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (checked in `choose`).
        3 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked in `choose`).
        2 => unsafe { dot_avx2(a, b) },
        _ => dot_portable(a, b),
    }
}

/// Eight running sums, which the compiler keeps in vector registers.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): i + 64 <= n, then i + 16 <= n, then a masked load
    // of the n - i < 16 values left.
    while i + 64 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(pa.add(i + 16 * j)),
                    _mm512_loadu_ps(pb.add(i + 16 * j)),
                )
            };
            *acc = _mm512_fmadd_ps(x, y, *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
        acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u16 << (n - i)) - 1;
        let (x, y) = unsafe {
            (
                _mm512_maskz_loadu_ps(mask, pa.add(i)),
                _mm512_maskz_loadu_ps(mask, pb.add(i)),
            )
        };
        acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (both loads): i + 32 <= n, then i + 8 <= n.
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 values.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let tail: f32 = a[i..].iter().zip(&b[i..]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU has agrees with a sum in f64, at lengths around
    /// each kernel's block sizes.
    #[test]
    fn kernels_agree_with_a_plain_sum() {
        let mut rng = crate::common::rng::NormalRng::new(11);
        for n in [
            0, 1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 512, 768, 1000,
        ] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let tolerance = 1e-4 * (n as f64).max(1.0);
            let mut kernels: Vec<(&str, f32)> = vec![("portable", dot_portable(&a, &b))];
            #[cfg(target_arch = "x86_64")]
            {
                if choose() >= 2 {
                    // SAFETY: checked just above.
                    kernels.push(("avx2", unsafe { dot_avx2(&a, &b) }));
                }
                if choose() == 3 {
                    // SAFETY: checked just above.
                    kernels.push(("avx512", unsafe { dot_avx512(&a, &b) }));
                }
            }
            kernels.push(("dot", dot(&a, &b)));
            for (name, got) in kernels {
                assert!(
                    (got as f64 - want).abs() <= tolerance,
                    "{name} at {n}: {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn distance_of_a_unit_vector_to_itself_is_zero_not_negative() {
        use hnsw_rs::prelude::Distance;
        let v = crate::vector::unit(&[0.3, -1.7, 2.2, 0.01, 5.0]);
        assert!(DistDot.eval(&v, &v) >= 0.0);
        assert!(DistDot.eval(&v, &v) < 1e-6);
        let w: Vec<f32> = v.iter().map(|x| -x).collect();
        assert!((DistDot.eval(&v, &w) - 2.0).abs() < 1e-6);
    }
}
