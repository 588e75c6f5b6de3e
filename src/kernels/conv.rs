//! 2-D convolution as one matrix product per batch item and band of output rows, written straight into the NCHW
//! output: out (c_out × pixels) = W (c_out × c_in·kh·kw) · cols (c_in·kh·kw × pixels) + bias. A 1×1 convolution
//! multiplies the input itself; otherwise the band's `cols` (im2col, transposed) is built in a bounded buffer, so
//! large images never need a full-image im2col matrix.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::gemm::{matmul, View};
use super::gemm_bf16::{self, Kernel, Packed, MR};
use super::gemm_i8;

/// f32 elements of one band's im2col buffer (32 MiB).
const BAND_ELEMENTS: usize = 8 << 20;

#[derive(Debug, Clone, Copy)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
}

struct Conv2dOp(ConvParams);

struct Geometry {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    h_out: usize,
    w_out: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    /// Fills `cols` ((c_in·kh·kw) × (rows·w_out)) for output rows `first_row..first_row + rows` of one image.
    fn im2col(&self, image: &[f32], cols: &mut [f32], first_row: usize, rows: usize) {
        let width = rows * self.w_out;
        cols.par_chunks_mut(width).enumerate().for_each(|(r, col)| self.im2col_row(image, r, first_row, col));
    }

    /// Row `r` (input channel c, kernel tap ky, kx) of the im2col matrix for output rows `first_row..` (as many
    /// as `out` holds).
    fn im2col_row(&self, image: &[f32], r: usize, first_row: usize, out: &mut [f32]) {
        let (c, ky, kx) = (r / (self.kh * self.kw), r / self.kw % self.kh, r % self.kw);
        let plane = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
        for (oy, out) in (first_row..).zip(out.chunks_mut(self.w_out)) {
            let iy = (oy * self.stride + ky) as isize - self.padding as isize;
            if iy < 0 || iy >= self.h as isize {
                out.fill(0.0);
                continue;
            }
            let row = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
            if self.stride == 1 {
                // Output x maps to input x + kx − padding: one shifted copy with zero edges.
                let shift = kx as isize - self.padding as isize;
                let start = (-shift).clamp(0, self.w_out as isize) as usize;
                let end = (self.w as isize - shift).clamp(start as isize, self.w_out as isize) as usize;
                out[..start].fill(0.0);
                out[start..end]
                    .copy_from_slice(&row[(start as isize + shift) as usize..(end as isize + shift) as usize]);
                out[end..].fill(0.0);
            } else {
                for (ox, o) in out.iter_mut().enumerate() {
                    let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                    *o = if ix >= 0 && ix < self.w as isize { row[ix as usize] } else { 0.0 };
                }
            }
        }
    }

    /// For each output pixel of rows `first_row..first_row + rows`, the largest of `pixel_max` (one value per
    /// input pixel) over its receptive field: the largest magnitude of its im2col column when `pixel_max` holds
    /// each input pixel's largest magnitude over the channels (padding adds only zeros).
    fn window_max(&self, pixel_max: &[f32], first_row: usize, rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * self.w_out];
        out.par_chunks_mut(self.w_out).enumerate().for_each(|(r, out)| {
            let oy = first_row + r;
            for ky in 0..self.kh {
                let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                if iy < 0 || iy >= self.h as isize {
                    continue;
                }
                let row = &pixel_max[iy as usize * self.w..(iy as usize + 1) * self.w];
                for (ox, o) in out.iter_mut().enumerate() {
                    for kx in 0..self.kw {
                        let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                        if ix >= 0 && ix < self.w as isize {
                            *o = o.max(row[ix as usize]);
                        }
                    }
                }
            }
        });
        out
    }

    fn new(h: usize, w: usize, kh: usize, kw: usize, ConvParams { stride, padding }: ConvParams) -> Result<Self> {
        if stride == 0 {
            candle_core::bail!("conv2d: stride 0");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: a {kh}×{kw} kernel does not fit a {h}×{w} input padded by {padding}");
        }
        Ok(Self {
            h,
            w,
            kh,
            kw,
            h_out: (h + 2 * padding - kh) / stride + 1,
            w_out: (w + 2 * padding - kw) / stride + 1,
            stride,
            padding,
        })
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "dreamshaper-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, c_in, h, w) = x_layout.shape().dims4()?;
        let (c_out, wc_in, kh, kw) = weight_layout.shape().dims4()?;
        if wc_in != c_in || bias_layout.shape().elem_count() != c_out {
            candle_core::bail!(
                "conv2d: input {:?}, weight {:?}, bias {:?} do not fit",
                x_layout.shape(),
                weight_layout.shape(),
                bias_layout.shape()
            );
        }
        let g = Geometry::new(h, w, kh, kw, self.0)?;
        let (x, weight, bias) =
            (contiguous_f32(x, x_layout)?, contiguous_f32(weight, weight_layout)?, contiguous_f32(bias, bias_layout)?);
        let (pixels, depth) = (g.h_out * g.w_out, c_in * kh * kw);
        let threads = rayon::current_num_threads();
        let mut out = bias_planes(bias, batch, pixels);
        let pointwise = g.pointwise();
        let band_rows = if pointwise { g.h_out } else { (BAND_ELEMENTS / (depth * g.w_out).max(1)).clamp(1, g.h_out) };
        let mut cols = if pointwise { Vec::new() } else { vec![0f32; depth * band_rows * g.w_out] };
        let w_view = View::row_major(weight, depth);
        for (image, out) in x.chunks(c_in * h * w).zip(out.chunks_mut(c_out * pixels)) {
            let mut first_row = 0;
            while first_row < g.h_out {
                let rows = band_rows.min(g.h_out - first_row);
                let width = rows * g.w_out;
                let columns = if pointwise {
                    View::row_major(image, pixels)
                } else {
                    g.im2col(image, &mut cols[..depth * width], first_row, rows);
                    View::row_major(&cols[..depth * width], width)
                };
                let dst = &mut out[first_row * g.w_out..];
                matmul(dst, pixels, w_view, columns, (c_out, width, depth), true, threads);
                first_row += rows;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, g.h_out, g.w_out))))
    }
}

/// conv2d of an f32 CPU tensor (batch, c_in, h, w) with `weight` (c_out, c_in, kh, kw) and `bias` (c_out).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, params: ConvParams) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &Conv2dOp(params))
}

/// The output buffer (batch, c_out, pixels) with every plane set to its channel's bias, written in parallel.
fn bias_planes(bias: &[f32], batch: usize, pixels: usize) -> Vec<f32> {
    let c_out = bias.len();
    // SAFETY: every element of every plane is written.
    unsafe {
        super::filled_par(batch * c_out * pixels, pixels, |plane, chunk| {
            for v in chunk {
                v.write(bias[plane % c_out]);
            }
        })
    }
}

/// How a [`PackedConv`] keeps its weight (c_out × depth, the left operand of the product, packed once at load) and
/// multiplies each band of im2col columns by it.
pub trait ConvFormat: Send + Sync + 'static {
    /// The op's name in candle's graph.
    const NAME: &'static str;
    /// Elements of a band's im2col columns (depth × band width), to bound the packed band's memory.
    const BAND_ELEMENTS: usize;
    type Weight: Send + Sync + std::fmt::Debug;
    fn pack(weight: &[f32], c_out: usize, depth: usize) -> Self::Weight;
    fn depth(weight: &Self::Weight) -> usize;
    /// out (c_out rows of stride `ldc`, from the band's first pixel) += W · columns: `width` columns whose `depth`
    /// rows `fill(r, row)` writes; `column_max()` gives each column's largest magnitude, for formats that need it.
    fn multiply_band(
        out: &mut [f32],
        ldc: usize,
        weight: &Self::Weight,
        width: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
        column_max: impl FnOnce() -> Vec<f32>,
    );
}

impl ConvFormat for super::Bf16 {
    const NAME: &'static str = "dreamshaper-conv2d-bf16";
    // The packed band holds depth/2 × width pairs of bf16.
    const BAND_ELEMENTS: usize = BAND_ELEMENTS;
    type Weight = (Packed, Kernel);

    fn pack(weight: &[f32], c_out: usize, depth: usize) -> Self::Weight {
        (Packed::from_rows(weight, c_out, depth, MR), Kernel::detect())
    }

    fn depth((weight, _): &Self::Weight) -> usize {
        weight.k()
    }

    fn multiply_band(
        out: &mut [f32],
        ldc: usize,
        (weight, kernel): &Self::Weight,
        width: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
        _: impl FnOnce() -> Vec<f32>,
    ) {
        let columns = Packed::from_row_writer(width, weight.k(), fill);
        gemm_bf16::gemm(out, ldc, weight, &columns, *kernel);
    }
}

impl ConvFormat for super::Int8 {
    const NAME: &'static str = "dreamshaper-conv2d-int8";
    // The packed band holds depth × width bytes.
    const BAND_ELEMENTS: usize = 4 * BAND_ELEMENTS;
    type Weight = (gemm_i8::LeftI8, gemm_i8::Kernel);

    fn pack(weight: &[f32], c_out: usize, depth: usize) -> Self::Weight {
        let kernel = gemm_i8::Kernel::detect();
        (gemm_i8::LeftI8::from_rows(weight, c_out, depth, kernel), kernel)
    }

    fn depth((weight, _): &Self::Weight) -> usize {
        weight.k()
    }

    /// The columns are quantized per output pixel, with the largest magnitude of its receptive field as its scale.
    fn multiply_band(
        out: &mut [f32],
        ldc: usize,
        (weight, kernel): &Self::Weight,
        width: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
        column_max: impl FnOnce() -> Vec<f32>,
    ) {
        let scales = column_max().into_iter().map(gemm_i8::scale_for).collect();
        let columns = gemm_i8::RightI8::from_row_writer(width, weight.k(), scales, *kernel, fill);
        gemm_i8::gemm(out, ldc, weight, &columns, *kernel);
    }
}

/// A convolution whose weight is packed once in format `F`: f32 activations in and out, each band of im2col
/// columns packed as it is written.
#[derive(Debug)]
pub struct PackedConv<F: ConvFormat> {
    weight: F::Weight,
    bias: Vec<f32>,
    c_in: usize,
    kh: usize,
    kw: usize,
    params: ConvParams,
}

/// Convolution on bf16 weights (`--dtype bf16` on the CPU: mixed precision on CPUs with AVX512-BF16).
pub type Conv2dBf16 = PackedConv<super::Bf16>;
/// Convolution on int8 weights quantized per output channel (`--dtype int8`).
pub type Conv2dI8 = PackedConv<super::Int8>;

impl<F: ConvFormat> PackedConv<F> {
    /// `weight` (c_out, c_in, kh, kw) and `bias` (c_out), any float dtype, on the CPU.
    pub fn new(weight: &Tensor, bias: &Tensor, params: ConvParams) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if bias.elem_count() != c_out {
            candle_core::bail!("conv2d: bias of {} elements for {c_out} output channels", bias.elem_count());
        }
        Ok(Self {
            weight: super::with_f32_data(weight, |w| F::pack(w, c_out, c_in * kh * kw))?,
            bias: bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            c_in,
            kh,
            kw,
            params,
        })
    }

    /// The convolution of `x` (batch, c_in, h, w) f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

/// Each pixel's largest magnitude over the channels of `image` (c × h × w), row by row over rayon's pool.
fn pixel_maxima(image: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut pixel_max = vec![0f32; h * w];
    pixel_max.par_chunks_mut(w).enumerate().for_each(|(y, maxima)| {
        for plane in image.chunks(h * w) {
            for (m, v) in maxima.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                *m = m.max(v.abs());
            }
        }
    });
    pixel_max
}

impl<F: ConvFormat> CustomOp1 for PackedConv<F> {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, c_in, h, w) = x_layout.shape().dims4()?;
        if c_in != self.c_in {
            candle_core::bail!("conv2d: input {:?} for a weight of {} input channels", x_layout.shape(), self.c_in);
        }
        let g = Geometry::new(h, w, self.kh, self.kw, self.params)?;
        let x = contiguous_f32(x, x_layout)?;
        let (c_out, pixels, depth) = (self.bias.len(), g.h_out * g.w_out, F::depth(&self.weight));
        let band_rows = (F::BAND_ELEMENTS / (depth * g.w_out).max(1)).clamp(1, g.h_out);
        let mut out = bias_planes(&self.bias, batch, pixels);
        for (image, out) in x.chunks(c_in * h * w).zip(out.chunks_mut(c_out * pixels)) {
            // Computed on first use, once per image.
            let pixel_max = std::cell::OnceCell::new();
            let mut first_row = 0;
            while first_row < g.h_out {
                let rows = band_rows.min(g.h_out - first_row);
                let width = rows * g.w_out;
                let column_max = || g.window_max(pixel_max.get_or_init(|| pixel_maxima(image, h, w)), first_row, rows);
                // Row r of the band's im2col: for a 1×1 convolution, the band's part of input plane r as it is.
                let start = first_row * g.w_out;
                let fill = |r: usize, row: &mut [f32]| {
                    if g.pointwise() {
                        row.copy_from_slice(&image[r * pixels + start..r * pixels + start + width])
                    } else {
                        g.im2col_row(image, r, first_row, row)
                    }
                };
                F::multiply_band(&mut out[start..], pixels, &self.weight, width, fill, column_max);
                first_row += rows;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, g.h_out, g.w_out))))
    }
}
