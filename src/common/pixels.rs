//! 8-bit RGB pixels: a borrowed view, and Pillow's convolution resampler
//! reproduced integer for integer (separable, support scaled with the
//! reduction so it antialiases, 22-bit fixed-point coefficients, horizontal
//! pass then vertical, rounding to 8 bits after each pass). The model's
//! preprocessing, thumbnails and training crops all resize with it.

/// A buffer whose length does not match its size.
#[derive(Debug, thiserror::Error)]
#[error("an RGB buffer of {len} bytes is not {width}x{height}x3")]
pub struct BadRgbBuffer {
    pub len: usize,
    pub width: usize,
    pub height: usize,
}

/// A borrowed 8-bit RGB image, rows top to bottom, pixels interleaved.
#[derive(Clone, Copy, Debug)]
pub struct RgbView<'a> {
    pub width: usize,
    pub height: usize,
    pub data: &'a [u8],
}

impl<'a> RgbView<'a> {
    pub fn new(width: usize, height: usize, data: &'a [u8]) -> Result<Self, BadRgbBuffer> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(BadRgbBuffer {
                len: data.len(),
                width,
                height,
            });
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// Pillow's resampling filters, numbered as `PIL.Image.Resampling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    /// The filter's support radius and kernel (Pillow `Resample.c`).
    fn kernel(self) -> (f64, fn(f64) -> f64) {
        fn bicubic(x: f64) -> f64 {
            const A: f64 = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
        fn bilinear(x: f64) -> f64 {
            let x = x.abs();
            if x < 1.0 { 1.0 - x } else { 0.0 }
        }
        fn box_filter(x: f64) -> f64 {
            if (-0.5..0.5).contains(&x) { 1.0 } else { 0.0 }
        }
        fn hamming(x: f64) -> f64 {
            let x = x.abs();
            if x == 0.0 {
                1.0
            } else if x >= 1.0 {
                0.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x * (0.46 + 0.54 * x.cos())
            }
        }
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        fn lanczos(x: f64) -> f64 {
            if (-3.0..3.0).contains(&x) {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            }
        }
        match self {
            Self::Nearest | Self::Box => (0.5, box_filter),
            Self::Bilinear => (1.0, bilinear),
            Self::Hamming => (1.0, hamming),
            Self::Bicubic => (2.0, bicubic),
            Self::Lanczos => (3.0, lanczos),
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, count, and fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize, resample: Resample) -> Coeffs {
    let (support, filter) = resample.kernel();
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..count {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes like `PIL.Image.resize(size, resample)` on an RGB image.
pub fn resample(image: RgbView, out_w: usize, out_h: usize, filter: Resample) -> Vec<u8> {
    if filter == Resample::Nearest {
        return nearest(image, out_w, out_h);
    }
    let (in_w, in_h) = (image.width, image.height);
    let horiz = precompute_coeffs(in_w, out_w, filter);
    let vert = precompute_coeffs(in_h, out_h, filter);
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    // Only rows the vertical pass reads go through the horizontal pass.
    let (first, last) = if need_v {
        let (ymin_last, ycount_last) = vert.bounds[out_h - 1];
        (vert.bounds[0].0, ymin_last + ycount_last)
    } else {
        (0, in_h)
    };
    let half = 1i32 << (PRECISION_BITS - 1);

    let temp: std::borrow::Cow<[u8]> = if need_h {
        let rows = last - first;
        let mut temp = vec![0u8; rows * out_w * 3];
        for (ty, out_row) in temp.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row = &image.data[(ty + first) * in_w * 3..(ty + first + 1) * in_w * 3];
            for xx in 0..out_w {
                let (xmin, count) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + count];
                let (mut s0, mut s1, mut s2) = (half, half, half);
                for (x, &w) in k.iter().enumerate() {
                    let p = (xmin + x) * 3;
                    s0 += in_row[p] as i32 * w;
                    s1 += in_row[p + 1] as i32 * w;
                    s2 += in_row[p + 2] as i32 * w;
                }
                out_row[xx * 3] = clip8(s0);
                out_row[xx * 3 + 1] = clip8(s1);
                out_row[xx * 3 + 2] = clip8(s2);
            }
        }
        std::borrow::Cow::Owned(temp)
    } else {
        std::borrow::Cow::Borrowed(&image.data[first * in_w * 3..last * in_w * 3])
    };
    if !need_v {
        return temp.into_owned();
    }
    let row_len = out_w * 3;
    let mut out = vec![0u8; out_h * row_len];
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, count) = vert.bounds[yy];
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + count];
        let ymin = ymin - first;
        let mut acc = vec![half; row_len];
        for (y, &w) in k.iter().enumerate() {
            let in_row = &temp[(ymin + y) * row_len..(ymin + y + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += p as i32 * w;
            }
        }
        for (o, a) in out_row.iter_mut().zip(acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow's nearest-neighbour resize: the source pixel under each output pixel's centre.
fn nearest(image: RgbView, out_w: usize, out_h: usize) -> Vec<u8> {
    let sx = image.width as f64 / out_w as f64;
    let sy = image.height as f64 / out_h as f64;
    let mut out = Vec::with_capacity(out_w * out_h * 3);
    for y in 0..out_h {
        let iy = (((y as f64 + 0.5) * sy) as usize).min(image.height - 1);
        for x in 0..out_w {
            let ix = (((x as f64 + 0.5) * sx) as usize).min(image.width - 1);
            let p = (iy * image.width + ix) * 3;
            out.extend_from_slice(&image.data[p..p + 3]);
        }
    }
    out
}
