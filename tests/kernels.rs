//! The fused CPU kernels against candle's own op compositions (and f64 references) on random inputs of the
//! shapes SDXL uses, including odd sizes, strides and the band splitting of large convolutions.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Conv2dConfig;
use dreamshaper::kernels::conv::{conv2d, ConvParams};
use dreamshaper::kernels::{geglu::geglu, group_norm::group_norm};

fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    assert_eq!(a.dims(), b.dims());
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Standard normal samples, seeded by the call's rank within its test (each test runs on its own thread), so that
/// every run checks the same inputs.
fn randn(shape: &[usize]) -> Tensor {
    thread_local!(static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
    let seed = CALLS.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    dreamshaper::rng::TorchRng::new(seed).randn_tensor(shape, &Device::Cpu).unwrap()
}

#[test]
fn convolution_matches_candle_in_f64() {
    // (batch, c_in, c_out, h, w, kernel, stride, padding)
    let cases = [
        (2, 4, 8, 9, 7, 3, 1, 1),
        (2, 16, 16, 33, 17, 3, 2, 1),
        (1, 8, 4, 5, 5, 1, 1, 0),
        (2, 3, 5, 12, 10, 3, 1, 0),
        (1, 2, 3, 6, 6, 3, 2, 0),
        // More than one band of output rows: depth 8·9 = 72, width 1500 → ~77 rows per band of 8 Mi elements.
        (1, 8, 2, 200, 1500, 3, 1, 1),
    ];
    for (b, c_in, c_out, h, w, k, stride, padding) in cases {
        let x = randn(&[b, c_in, h, w]);
        let weight = randn(&[c_out, c_in, k, k]);
        let bias = randn(&[c_out]);
        let ours = conv2d(&x, &weight, &bias, ConvParams { stride, padding }).unwrap();
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let config = Conv2dConfig { padding, stride, ..Default::default() };
        let reference = candle_nn::Conv2d::new(f64(&weight), Some(f64(&bias)), config).forward(&f64(&x)).unwrap();
        let err = max_relative(&ours, &reference);
        assert!(err < 1e-6, "{:?}: relative error {err:e}", (b, c_in, c_out, h, w, k, stride, padding));
    }
    // A kernel larger than the padded input is an error, not a panic.
    let e = conv2d(&randn(&[1, 1, 1, 1]), &randn(&[1, 1, 3, 3]), &randn(&[1]), ConvParams { stride: 1, padding: 0 });
    assert!(e.unwrap_err().to_string().contains("does not fit"));
}

/// The int8 convolution (`--dtype int8`) against an f64 reference: within quantization error, including where one
/// input pixel is 100× its neighbours, which only the output pixels whose receptive field holds it may scale for
/// (a per-pixel scale computed over the wrong window would clamp it or waste the range of its neighbours).
#[test]
fn int8_convolution_stays_within_quantization_error() {
    use dreamshaper::kernels::conv::Conv2dI8;
    let cases = [
        (2, 4, 8, 9, 7, 3, 1, 1),
        (2, 16, 16, 33, 17, 3, 2, 1),
        (1, 8, 4, 5, 5, 1, 1, 0),
        (2, 3, 5, 12, 10, 3, 1, 0),
        (1, 8, 2, 200, 1500, 3, 1, 1),
    ];
    for (b, c_in, c_out, h, w, k, stride, padding) in cases {
        let mut values = randn(&[b, c_in, h, w]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // An outlier at row 2, column 3 of the first channel of the first image.
        values[2 * w + 3] *= 100.0;
        let x = Tensor::from_vec(values, (b, c_in, h, w), &Device::Cpu).unwrap();
        let weight = randn(&[c_out, c_in, k, k]);
        let bias = randn(&[c_out]);
        let params = ConvParams { stride, padding };
        let ours = Conv2dI8::new(&weight, &bias, params).unwrap().forward(&x).unwrap();
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let config = Conv2dConfig { padding, stride, ..Default::default() };
        let reference = candle_nn::Conv2d::new(f64(&weight), Some(f64(&bias)), config).forward(&f64(&x)).unwrap();
        // Away from the outlier, each output's error is relative to its own inputs: compare per output pixel
        // against the magnitude of that pixel's outputs.
        let err = max_relative(&ours, &reference);
        assert!(err < 0.03, "{:?}: relative error {err:e}", (b, c_in, c_out, h, w, k, stride, padding));
        let far = (
            ours.narrow(2, ours.dim(2).unwrap() - 1, 1).unwrap(),
            reference.narrow(2, ours.dim(2).unwrap() - 1, 1).unwrap(),
        );
        let err = max_relative(&far.0, &far.1);
        assert!(err < 0.05, "{:?}: relative error {err:e} in the last row", (b, c_in, c_out, h, w, k, stride, padding));
    }
}

#[test]
fn group_norm_with_and_without_silu_matches_candle() {
    for (b, c, h, w, groups) in [(2, 64, 9, 7, 32), (1, 32, 16, 16, 32), (2, 12, 5, 3, 4)] {
        // Shifted inputs: a mean far from 0 tests the variance's two-pass accumulation.
        let x = randn(&[b, c, h, w]).affine(3.0, 20.0).unwrap();
        let gamma = randn(&[c]);
        let beta = randn(&[c]);
        let reference = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-5).unwrap();
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let exact =
            candle_nn::GroupNorm::new(f64(&gamma), f64(&beta), c, groups, 1e-5).unwrap().forward(&f64(&x)).unwrap();
        let ours = group_norm(&x, &gamma, &beta, groups, 1e-5, false).unwrap();
        assert!(max_relative(&ours, &exact) < 1e-6, "{:?}", (b, c, h, w, groups));
        let ours = group_norm(&x, &gamma, &beta, groups, 1e-5, true).unwrap();
        let expected = candle_nn::ops::silu(&reference.forward(&x).unwrap()).unwrap();
        assert!(max_relative(&ours, &expected) < 2e-6, "silu {:?}", (b, c, h, w, groups));
    }
    let e = group_norm(&randn(&[1, 6, 2, 2]), &randn(&[6]), &randn(&[6]), 4, 1e-5, false).unwrap_err();
    assert!(e.to_string().contains("groups"), "{e}");
}

#[test]
fn group_norm_by_given_statistics_measured_piecewise() {
    use dreamshaper::kernels::group_norm::{group_norm_given, region_moments, Moments};
    let (b, c, h, w, groups) = (2, 12, 9, 7, 4);
    let x = randn(&[b, c, h, w]).affine(3.0, 20.0).unwrap();
    let (gamma, beta) = (randn(&[c]), randn(&[c]));
    // Moments of the top rows and the bottom rows, merged, are the whole image's.
    let top = region_moments(&x, groups, 0..4, 0..w).unwrap();
    let bottom = region_moments(&x, groups, 4..h, 0..w).unwrap();
    let merged: Vec<(f64, f64)> = top.iter().zip(&bottom).map(|(t, b)| t.merge(*b).mean_variance()).collect();
    let whole: Vec<(f64, f64)> =
        region_moments(&x, groups, 0..h, 0..w).unwrap().iter().map(Moments::mean_variance).collect();
    for ((m1, v1), (m2, v2)) in merged.iter().zip(&whole) {
        assert!((m1 - m2).abs() < 1e-9 * m2.abs() && (v1 - v2).abs() < 1e-9 * v2, "{merged:?} vs {whole:?}");
    }
    // Normalising by the whole image's statistics = the ordinary GroupNorm, for the image and for a band of it.
    let ordinary = group_norm(&x, &gamma, &beta, groups, 1e-5, true).unwrap();
    let given = group_norm_given(&x, &gamma, &beta, groups, 1e-5, true, &merged).unwrap();
    assert!(max_relative(&given, &ordinary) < 1e-6);
    let band = group_norm_given(&x.narrow(2, 3, 4).unwrap(), &gamma, &beta, groups, 1e-5, true, &merged).unwrap();
    assert!(max_relative(&band, &ordinary.narrow(2, 3, 4).unwrap()) < 1e-6);
    // A region outside the tensor, and statistics for the wrong number of groups, are errors.
    assert!(region_moments(&x, groups, 0..h + 1, 0..w).is_err());
    assert!(group_norm_given(&x, &gamma, &beta, groups, 1e-5, true, &merged[..3]).is_err());

    // The layer's generic path (other dtypes and devices; f64 here) agrees with the fused one.
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("weight".to_string(), f64(&gamma));
    tensors.insert("bias".to_string(), f64(&beta));
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
    let layer = dreamshaper::models::layers::group_norm(groups, c, 1e-5, vb).unwrap();
    let generic = layer.forward_given(&f64(&x), &merged, true).unwrap();
    assert_eq!(generic.dtype(), DType::F64);
    assert!(max_relative(&generic, &ordinary) < 1e-6);
    assert!(layer.forward_given(&f64(&x), &merged[..4], true).is_err());
}

#[test]
fn geglu_matches_value_times_exact_gelu() {
    for shape in [[2usize, 77, 40], [1, 4096, 2560], [3, 5, 2]] {
        let x = (randn(&shape) * 4.0).unwrap();
        let half = shape[2] / 2;
        let f64 = x.to_dtype(DType::F64).unwrap();
        let exact = (f64.narrow(D::Minus1, 0, half).unwrap()
            * f64.narrow(D::Minus1, half, half).unwrap().gelu_erf().unwrap())
        .unwrap();
        let ours = geglu(&x).unwrap();
        // erf to 1.5e-7 absolute (PyTorch's own vectorised formula), relative to the largest output.
        assert!(max_relative(&ours, &exact) < 2e-6, "{shape:?}");
    }
    assert!(geglu(&randn(&[2, 3])).unwrap_err().to_string().contains("even"));
}

#[test]
fn linear_over_all_leading_dimensions_matches_candle() {
    use dreamshaper::kernels::linear::linear;
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    for (shape, n) in [(vec![2usize, 77, 48], 40usize), (vec![3, 5], 7), (vec![2, 2, 9, 16], 33), (vec![0, 8], 4)] {
        let k = *shape.last().unwrap();
        let x = randn(&shape);
        let (weight, bias) = (randn(&[n, k]), randn(&[n]));
        let exact = candle_nn::Linear::new(f64(&weight), Some(f64(&bias))).forward(&f64(&x)).unwrap();
        let ours = linear(&x, &weight, Some(&bias)).unwrap();
        if exact.elem_count() > 0 {
            assert!(max_relative(&ours, &exact) < 1e-6, "{shape:?} → {n}");
        }
        assert_eq!(ours.dims(), exact.dims());
        let exact = candle_nn::Linear::new(f64(&weight), None).forward(&f64(&x)).unwrap();
        let ours = linear(&x, &weight, None).unwrap();
        if exact.elem_count() > 0 {
            assert!(max_relative(&ours, &exact) < 1e-6, "no bias {shape:?} → {n}");
        }
    }
    let e = linear(&randn(&[2, 5]), &randn(&[3, 4]), None).unwrap_err();
    assert!(e.to_string().contains("4 inputs"), "{e}");
}

#[test]
fn blocked_transpose_matches_candle() {
    for (rows, cols) in [(1, 1), (3, 130), (64, 64), (129, 70)] {
        let m = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu).unwrap().reshape((rows, cols)).unwrap();
        let want = m.t().unwrap().contiguous().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(dreamshaper::kernels::linear::transpose(&m).unwrap().to_vec2::<f32>().unwrap(), want);
    }
}
