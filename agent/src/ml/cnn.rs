//! Direct convolutions and max pooling for the small networks factories run at the machine.
//!
//! tract lowers a float convolution to im2col and a matrix product, except on wide images (its
//! own direct convolution takes output rows of 128 points or more, and two spatial axes only).
//! On the few channels of a small image or signal network, the matrix product wastes most of its
//! tile and im2col dominates; and its max pooling walks every window through a generic patch
//! scanner. Measured on the fixture image network, those took most of the time.
//!
//! - [`DirectConv`] computes a convolution straight from a zero-padded copy of each sample, four
//!   output channels at a time along each output row, with tract's own four-channel kernel
//!   (`conv_w4`: AVX2 and FMA on x86_64, NEON on aarch64). A ReLU after it (the maximum with a
//!   constant) is fused into it, applied to each row as it is written.
//! - [`DirectMaxPool`] takes the maximum of each window row by row, in plain loops the compiler
//!   vectorises.
//!
//! [`direct`] swaps them in for every eligible `Conv` and `MaxPool` of a decluttered model,
//! before tract's optimiser runs: float32, NCHW, no dilation, one or two spatial axes, the
//! channels and spatial sizes known (the batch may be free); a convolution also needs one group,
//! a constant kernel and bias, and a host with the kernel. Anything else keeps tract's lowering.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::conv::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::cnn::{MaxPool, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::tract_linalg::routines::{conv_w4_f32, ConvW4F32};

/// Replace every eligible convolution and max pooling of `model` by [`DirectConv`] and
/// [`DirectMaxPool`], and fuse a ReLU that follows a direct convolution into it; returns how
/// many operators were replaced or fused. On an error, `model` is left as it was.
pub fn direct(model: &mut TypedModel) -> TractResult<usize> {
    if !model.nodes().iter().any(|n| n.op_is::<Conv>() || n.op_is::<MaxPool>()) {
        return Ok(0);
    }
    let mut swapped = model.clone();
    let replaced = swap(&mut swapped)?;
    if replaced > 0 {
        *model = swapped;
    }
    Ok(replaced)
}

fn swap(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if let Some((conv, fused)) = DirectConv::with_floor(model, node)? {
            let patch = TypedModelPatch::fuse_with_next(model, model.node(conv), fused)?;
            patch.apply(model)?;
            replaced += 1;
            continue;
        }
        let op: Option<Box<dyn TypedOp>> = if let Some(conv) = node.op_as::<Conv>() {
            DirectConv::for_node(model, node, conv)?.map(|op| Box::new(op) as _)
        } else if let Some(pool) = node.op_as::<MaxPool>() {
            DirectMaxPool::for_node(model, node, pool)?.map(|op| Box::new(op) as _)
        } else {
            None
        };
        let Some(op) = op else { continue };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The spatial geometry of a convolution or a pooling over one or two axes, held in two axes:
/// a signal has a height of one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Geometry {
    /// The spatial rank of the original operator (1 or 2), for the output's shape.
    rank: usize,
    /// Input channels.
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Padding before and after each axis.
    pad: [usize; 2],
    after: [usize; 2],
    out: [usize; 2],
}

impl Geometry {
    /// The geometry of `spec` over `x`, or `None` unless `x` is float32 NCHW with one or two
    /// spatial axes, no dilation, and its channels and spatial sizes known.
    fn of(spec: &PoolSpec, x: &TypedFact) -> Option<Geometry> {
        let rank = spec.rank();
        if spec.data_format != DataFormat::NCHW
            || !(1..=2).contains(&rank)
            || spec.dilations().iter().any(|d| *d != 1)
            || x.datum_type != f32::datum_type()
            || x.rank() != rank + 2
        {
            return None;
        }
        let dims: Vec<usize> = x
            .shape
            .iter()
            .skip(1)
            .map(|d| d.to_usize().ok())
            .collect::<Option<_>>()?;
        let padding = spec.computed_padding(&dims[1..]);
        let strides = spec.strides();
        let two = |f: &dyn Fn(usize) -> usize, one: usize| if rank == 1 { [one, f(0)] } else { [f(0), f(1)] };
        let geo = Geometry {
            rank,
            channels: dims[0],
            input: two(&|a| dims[1 + a], 1),
            kernel: two(&|a| spec.kernel_shape[a], 1),
            stride: two(&|a| strides[a], 1),
            pad: two(&|a| padding[a].pad_before, 0),
            after: two(&|a| padding[a].pad_after, 0),
            out: two(&|a| padding[a].convoluted, 1),
        };
        let empty = |d: &[usize; 2]| d.contains(&0);
        let sizes =
            (geo.channels > 0 && !empty(&geo.input) && !empty(&geo.kernel) && !empty(&geo.stride) && !empty(&geo.out))
                .then_some(())
                .and_then(|()| geo.sizes());
        sizes.map(|_| geo)
    }

    /// The padded input planes' size in values, and each window's reach along each axis,
    /// computed without overflow; `None` when something does not fit in `isize` (such a
    /// geometry keeps tract's lowering).
    fn sizes(&self) -> Option<usize> {
        let mut plane = self.channels;
        for a in 0..2 {
            let padded = self.input[a].checked_add(self.pad[a])?.checked_add(self.after[a])?;
            plane = plane.checked_mul(padded)?;
            (self.out[a] - 1)
                .checked_mul(self.stride[a])?
                .checked_add(self.kernel[a])?;
        }
        (plane <= isize::MAX as usize / 8).then_some(plane)
    }

    /// The input plane with its padding (its size is checked by [`Geometry::sizes`]).
    fn padded(&self) -> [usize; 2] {
        [0, 1].map(|a| self.input[a] + self.pad[a] + self.after[a])
    }

    /// Whether a tensor of `shape` is what this geometry takes, batch axis aside.
    fn takes(&self, shape: &[usize]) -> bool {
        let spatial = if self.rank == 1 {
            &self.input[1..]
        } else {
            &self.input[..]
        };
        shape.len() == self.rank + 2 && shape[1] == self.channels && shape[2..] == *spatial
    }

    /// The evaluation both operators share: the one input checked against this geometry, an
    /// output of `channels` channels, and `run(x, y, samples)` to fill it.
    fn eval(
        &self,
        op: &str,
        inputs: TVec<TValue>,
        channels: usize,
        run: impl FnOnce(&[f32], &mut [f32], usize) -> TractResult<()>,
    ) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            self.takes(shape),
            "{op}: an input of shape {shape:?}; expected {self:?}"
        );
        let n = shape[0];
        let x = x.try_as_plain_ram()?;
        let mut y = Tensor::zero::<f32>(&self.output_shape(n, channels))?;
        run(
            x.as_slice::<f32>()?,
            y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            n,
        )?;
        Ok(tvec!(y.into_tvalue()))
    }

    fn output_shape<D: Clone + From<usize>>(&self, n: D, channels: usize) -> TVec<D> {
        let mut shape: TVec<D> = tvec![n, channels.into()];
        if self.rank == 2 {
            shape.push(self.out[0].into());
        }
        shape.push(self.out[1].into());
        shape
    }
}

/// A group-1 float32 NCHW convolution over one or two spatial axes, computed directly.
#[derive(Debug, Clone)]
pub struct DirectConv {
    geo: Geometry,
    c_out: usize,
    /// The kernel in OIHW order, output channels padded with zeros to a multiple of four: the
    /// taps of four channels are one contiguous block, as `conv_w4` takes them.
    taps: Arc<Vec<f32>>,
    /// One bias per output channel, padded with zeros like the taps.
    bias: Arc<Vec<f32>>,
    /// Where each tap reads, from the first input point of an output row, in the padded plane.
    offsets: Arc<Vec<isize>>,
    /// A maximum with a constant fused into the convolution (a ReLU has 0).
    floor: Option<f32>,
}

impl PartialEq for DirectConv {
    fn eq(&self, other: &Self) -> bool {
        self.geo == other.geo
            && self.c_out == other.c_out
            && bits(&self.taps) == bits(&other.taps)
            && bits(&self.bias) == bits(&other.bias)
            && self.floor.map(f32::to_bits) == other.floor.map(f32::to_bits)
    }
}

impl Eq for DirectConv {}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

impl DirectConv {
    /// The direct form of `conv`, or `None` when it does not qualify.
    fn for_node(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<DirectConv>> {
        if conv_w4_f32().is_none()
            || conv.q_params.is_some()
            || conv.group != 1
            || conv.kernel_fmt != KernelFormat::OIHW
            || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let spec = &conv.pool_spec;
        let Some(geo) = Geometry::of(spec, model.outlet_fact(node.inputs[0])?) else {
            return Ok(None);
        };
        let (Some(kernel), Some(bias)) = (
            model.outlet_fact(node.inputs[1])?.konst.clone(),
            model.outlet_fact(node.inputs[2])?.konst.clone(),
        ) else {
            return Ok(None);
        };
        let c_out = spec.output_channels;
        let mut want = vec![c_out, geo.channels];
        want.extend(spec.kernel_shape.iter());
        if kernel.datum_type() != f32::datum_type()
            || bias.datum_type() != f32::datum_type()
            || geo.channels != spec.input_channels
            || kernel.shape() != want.as_slice()
            || c_out == 0
        {
            return Ok(None);
        }
        let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let padded = geo.padded();
        if (bias.len() != 1 && bias.len() != c_out)
            || (0..2).any(|a| (geo.out[a] - 1) * geo.stride[a] + geo.kernel[a] > padded[a])
        {
            return Ok(None);
        }
        let n = geo.channels * geo.kernel[0] * geo.kernel[1];
        let groups = c_out.div_ceil(4);
        let mut taps = kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        taps.resize(groups * 4 * n, 0.0);
        let mut bias = if bias.len() == 1 { vec![bias[0]; c_out] } else { bias };
        bias.resize(groups * 4, 0.0);
        let plane = (padded[0] * padded[1]) as isize;
        let mut offsets = Vec::with_capacity(n);
        for c in 0..geo.channels as isize {
            for ky in 0..geo.kernel[0] as isize {
                for kx in 0..geo.kernel[1] as isize {
                    offsets.push(c * plane + ky * padded[1] as isize + kx);
                }
            }
        }
        Ok(Some(DirectConv {
            geo,
            c_out,
            taps: Arc::new(taps),
            bias: Arc::new(bias),
            offsets: Arc::new(offsets),
            floor: None,
        }))
    }

    /// When `node` takes the maximum of a [`DirectConv`]'s output (its only use) and a
    /// constant, as a ReLU does: the convolution's node and the convolution with that floor.
    fn with_floor(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(usize, DirectConv)>> {
        let Some(bin) = node.op_as::<TypedBinOp>() else {
            return Ok(None);
        };
        if bin.0.name() != "Max" || bin.1.is_some() || node.inputs.len() != 2 {
            return Ok(None);
        }
        for (x, c) in [(0, 1), (1, 0)] {
            let source = node.inputs[x];
            let Some(conv) = model.node(source.node).op_as::<DirectConv>() else {
                continue;
            };
            let Some(k) = model.outlet_fact(node.inputs[c])?.konst.clone() else {
                continue;
            };
            let only_use = model.single_succ(source.node)?.is_some_and(|s| s.id == node.id)
                && !model.output_outlets()?.contains(&source);
            if conv.floor.is_none()
                && only_use
                && k.datum_type() == f32::datum_type()
                && k.len() == 1
                && model.outlet_fact(node.id.into())?.shape == model.outlet_fact(source)?.shape
            {
                let floor = k.try_as_plain_ram()?.as_slice::<f32>()?[0];
                if floor.is_nan() {
                    return Ok(None);
                }
                return Ok(Some((
                    source.node,
                    DirectConv {
                        floor: Some(floor),
                        ..conv.clone()
                    },
                )));
            }
        }
        Ok(None)
    }

    /// Convolve `n` samples of `x` into `y`.
    #[allow(unsafe_code)]
    fn run(&self, kernel: ConvW4F32, x: &[f32], y: &mut [f32], n: usize) -> TractResult<()> {
        let geo = &self.geo;
        let [h, w] = geo.input;
        let [hp, wp] = geo.padded();
        let [ho, wo] = geo.out;
        let [sh, sw] = geo.stride;
        let c_in = geo.channels;
        let sample_in = c_in * h * w;
        let sample_out = self.c_out * ho * wo;
        ensure!(
            x.len() == n * sample_in && y.len() == n * sample_out,
            "DirectConv: unexpected tensor sizes"
        );
        let padding = [hp, wp] != [h, w];
        let mut plane = if padding { vec![0f32; c_in * hp * wp] } else { vec![] };
        // The last output channels, when fewer than four, are computed into this scratch.
        let rest = self.c_out % 4;
        let mut scratch = if rest > 0 { vec![0f32; 4 * wo] } else { vec![] };
        let n_taps = self.offsets.len();
        // What the kernel reads and writes, checked here rather than trusted from construction.
        let reach = self.offsets.iter().max().map_or(0, |o| *o as usize) + (wo - 1) * sw;
        let plane_len = if padding { plane.len() } else { sample_in };
        ensure!(
            (ho - 1) * sh * wp + reach < plane_len
                && self.offsets.iter().all(|o| *o >= 0)
                && self.taps.len() == self.c_out.div_ceil(4) * 4 * n_taps
                && self.bias.len() == self.c_out.div_ceil(4) * 4,
            "DirectConv: inconsistent geometry"
        );
        for s in 0..n {
            let sample = &x[s * sample_in..][..sample_in];
            let input: &[f32] = if padding {
                for c in 0..c_in {
                    for r in 0..h {
                        let from = &sample[(c * h + r) * w..][..w];
                        plane[(c * hp + r + geo.pad[0]) * wp + geo.pad[1]..][..w].copy_from_slice(from);
                    }
                }
                &plane
            } else {
                sample
            };
            let out = &mut y[s * sample_out..][..sample_out];
            for oy in 0..ho {
                let row = &input[oy * sh * wp..];
                for g in 0..self.c_out.div_ceil(4) {
                    let taps = &self.taps[g * 4 * n_taps..][..4 * n_taps];
                    let bias: &[f32; 4] = self.bias[g * 4..][..4].try_into()?;
                    let whole = 4 * (g + 1) <= self.c_out;
                    // SAFETY: every tap reads `row[offsets[t] + i * stride]` for `i < wo`, at
                    // most `reach` past the row's start, inside the plane (checked above); the
                    // four output rows are `wo` points each, `ho * wo` apart in `out` (whole
                    // groups only, so channel `4g + 3 < c_out`) or `wo` apart in the scratch.
                    unsafe {
                        if whole {
                            let o = out[(4 * g * ho + oy) * wo..].as_mut_ptr();
                            kernel(
                                row.as_ptr(),
                                o,
                                taps,
                                &self.offsets,
                                bias,
                                wo,
                                sw as isize,
                                (ho * wo) as isize,
                            );
                        } else {
                            kernel(
                                row.as_ptr(),
                                scratch.as_mut_ptr(),
                                taps,
                                &self.offsets,
                                bias,
                                wo,
                                sw as isize,
                                wo as isize,
                            );
                            for o in 0..rest {
                                out[((4 * g + o) * ho + oy) * wo..][..wo].copy_from_slice(&scratch[o * wo..][..wo]);
                            }
                        }
                    }
                    // A fused ReLU (or any lower bound), on the rows just written.
                    if let Some(floor) = self.floor {
                        for o in 0..(self.c_out - 4 * g).min(4) {
                            for v in &mut out[((4 * g + o) * ho + oy) * wo..][..wo] {
                                *v = if *v > floor { *v } else { floor };
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "DirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}→{} channels, kernel {:?}, stride {:?}, padding {:?}, output {:?}, floor {:?}",
            self.geo.channels, self.c_out, self.geo.kernel, self.geo.stride, self.geo.pad, self.geo.out, self.floor
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let kernel = conv_w4_f32().context("DirectConv needs the conv_w4 kernel")?;
        self.geo
            .eval("DirectConv", inputs, self.c_out, |x, y, n| self.run(kernel, x, y, n))
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(
            self.geo.output_shape(inputs[0].shape[0].clone(), self.c_out)
        )))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let points = self.c_out * self.geo.out[0] * self.geo.out[1];
        let per_point = self.offsets.len();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape[0].clone() * (points * per_point)
        )))
    }

    as_op!();
}

/// A float32 NCHW max pooling over one or two spatial axes, window row by window row. Padding
/// is never a candidate: a window takes the maximum of the input points it covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirectMaxPool {
    geo: Geometry,
}

impl DirectMaxPool {
    /// The direct form of `pool`, or `None` when it does not qualify.
    fn for_node(model: &TypedModel, node: &TypedNode, pool: &MaxPool) -> TractResult<Option<DirectMaxPool>> {
        if pool.with_index_outputs.is_some() || node.inputs.len() != 1 {
            return Ok(None);
        }
        let Some(geo) = Geometry::of(&pool.pool_spec, model.outlet_fact(node.inputs[0])?) else {
            return Ok(None);
        };
        // Every window covers at least one input point.
        let covers =
            (0..2).all(|a| geo.kernel[a] > geo.pad[a] && (geo.out[a] - 1) * geo.stride[a] < geo.input[a] + geo.pad[a]);
        Ok(covers.then_some(DirectMaxPool { geo }))
    }

    /// Pool `planes` planes (samples × channels) of `x` into `y`.
    fn run(&self, x: &[f32], y: &mut [f32], planes: usize) -> TractResult<()> {
        let [h, w] = self.geo.input;
        let [ho, wo] = self.geo.out;
        let [kh, kw] = self.geo.kernel;
        let [sh, sw] = self.geo.stride;
        let [ph, pw] = self.geo.pad;
        ensure!(
            x.len() == planes * h * w && y.len() == planes * ho * wo,
            "DirectMaxPool: unexpected tensor sizes"
        );
        // Each output row: the maximum over the window's input rows, point by point (`column`),
        // then over each window's columns. As tract and onnxruntime do, the maximum starts from
        // the lowest finite value and takes a value only when it is greater, so NaN is never
        // taken. `v > m` lets the compiler use vector maximum instructions.
        let max = |m: f32, v: f32| if v > m { v } else { m };
        let mut column = vec![f32::MIN; w];
        for (src, dst) in x.chunks_exact(h * w).zip(y.chunks_exact_mut(ho * wo)) {
            for (oy, row) in dst.chunks_exact_mut(wo).enumerate() {
                let top = (oy * sh).saturating_sub(ph);
                let bottom = (oy * sh + kh).saturating_sub(ph).min(h);
                column.fill(f32::MIN);
                for line in src[top * w..bottom * w].chunks_exact(w) {
                    for (c, v) in column.iter_mut().zip(line) {
                        *c = max(*c, *v);
                    }
                }
                if sw == 2 && kw == 2 && pw == 0 && wo * 2 <= w {
                    // The usual 2×2 pooling, pairs side by side: a loop the compiler vectorises.
                    for (o, pair) in row.iter_mut().zip(column.chunks_exact(2)) {
                        *o = max(max(f32::MIN, pair[0]), pair[1]);
                    }
                } else if sw == kw && pw == 0 && wo * sw <= w {
                    // Windows side by side.
                    for (o, window) in row.iter_mut().zip(column.chunks_exact(sw)) {
                        *o = window.iter().fold(f32::MIN, |m, v| max(m, *v));
                    }
                } else {
                    for (ox, o) in row.iter_mut().enumerate() {
                        let left = (ox * sw).saturating_sub(pw);
                        let right = (ox * sw + kw).saturating_sub(pw).min(w);
                        *o = column[left..right].iter().fold(f32::MIN, |m, v| max(m, *v));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Op for DirectMaxPool {
    fn name(&self) -> StaticName {
        "DirectMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "kernel {:?}, stride {:?}, padding {:?}, output {:?}",
            self.geo.kernel, self.geo.stride, self.geo.pad, self.geo.out
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DirectMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let channels = self.geo.channels;
        self.geo.eval("DirectMaxPool", inputs, channels, |x, y, n| {
            self.run(x, y, n * channels)
        })
    }
}

impl TypedOp for DirectMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(
            self.geo.output_shape(inputs[0].shape[0].clone(), self.geo.channels)
        )))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::{Framework, InferenceModelExt};
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        c_in: usize,
        c_out: usize,
        spatial: Vec<usize>,
        kernel: Vec<usize>,
        strides: Vec<usize>,
        padding: PaddingSpec,
        bias_per_channel: bool,
        group: usize,
        dilation: usize,
    }

    /// A case with a bias per channel, one group and no dilation.
    fn case(
        c_in: usize,
        c_out: usize,
        spatial: &[usize],
        kernel: &[usize],
        strides: &[usize],
        padding: PaddingSpec,
    ) -> Case {
        Case {
            c_in,
            c_out,
            spatial: spatial.to_vec(),
            kernel: kernel.to_vec(),
            strides: strides.to_vec(),
            padding,
            bias_per_channel: true,
            group: 1,
            dilation: 1,
        }
    }

    /// A model of one convolution, with a symbolic batch axis; `floor`: followed by the maximum
    /// with that constant (0 for a ReLU).
    fn model(case: &Case, floor: Option<f32>) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let n = model.symbols.sym("N");
        let mut shape: TVec<TDim> = tvec![n.into(), case.c_in.to_dim()];
        shape.extend(case.spatial.iter().map(|d| d.to_dim()));
        let x = model.add_source("x", f32::fact(shape))?;
        let mut kshape = vec![case.c_out, case.c_in / case.group];
        kshape.extend(&case.kernel);
        let kvol: usize = kshape.iter().product();
        let kernel = model.add_const("k", tensor1(&values(kvol, 7)).into_shape(&kshape)?)?;
        let bias = if case.bias_per_channel {
            tensor1(&values(case.c_out, 11))
        } else {
            tensor0(0.25f32)
        };
        let bias = model.add_const("b", bias)?;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: case.kernel.iter().copied().collect(),
                padding: case.padding.clone(),
                dilations: Some(tvec![case.dilation; case.kernel.len()]),
                strides: Some(case.strides.iter().copied().collect()),
                input_channels: case.c_in,
                output_channels: case.c_out,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: case.group,
            q_params: None,
        };
        let mut y = model.wire_node("conv", conv, &[x, kernel, bias])?;
        if let Some(floor) = floor {
            let ones = vec![1; case.spatial.len() + 2];
            let floor = model.add_const("floor", tensor1(&[floor]).into_shape(&ones)?)?;
            y = model.wire_node("relu", tract_onnx::tract_core::ops::math::max(), &[y[0], floor])?;
        }
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_runnable()?;
        Ok(plan.run(tvec!(input.clone().into_tvalue()))?.remove(0).into_tensor())
    }

    /// The direct convolution gives tract's own results, over strides, paddings (asymmetric and
    /// `SAME`), output channels that are not a multiple of four, a shared bias, rows shorter
    /// than a vector, one and two spatial axes, and a batch of samples.
    #[test]
    fn matches_tracts_convolution() -> TractResult<()> {
        let cases = [
            case(
                3,
                8,
                &[13, 17],
                &[3, 3],
                &[1, 1],
                PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            ),
            Case {
                bias_per_channel: false,
                ..case(
                    2,
                    6,
                    &[11, 40],
                    &[2, 5],
                    &[2, 3],
                    PaddingSpec::Explicit(tvec![0, 2], tvec![1, 0]),
                )
            },
            case(5, 3, &[6, 5], &[3, 3], &[1, 2], PaddingSpec::SameUpper),
            case(1, 8, &[100], &[7], &[2], PaddingSpec::Explicit(tvec![3], tvec![3])),
            case(4, 5, &[40], &[3], &[1], PaddingSpec::Valid),
            case(16, 16, &[70], &[5], &[4], PaddingSpec::SameLower),
        ];
        let cases = cases
            .iter()
            .enumerate()
            .flat_map(|c| [(c, None), (c, Some(0.0)), (c, Some(-0.25))]);
        for ((i, case), floor) in cases {
            let reference = model(case, floor)?.into_optimized()?;
            let mut convolved = model(case, floor)?.into_decluttered()?;
            let replaced = direct(&mut convolved)?;
            let want = if floor.is_some() { 2 } else { 1 };
            assert_eq!(replaced, want * usize::from(conv_w4_f32().is_some()), "case {i}");
            let convolved = convolved.into_optimized()?;
            if conv_w4_f32().is_some() {
                assert_eq!(
                    convolved
                        .nodes()
                        .iter()
                        .filter(|n| !n.op_is::<tract_onnx::tract_core::ops::konst::Const>())
                        .count(),
                    2,
                    "case {i}"
                );
            }
            for batch in [1, 3] {
                let mut shape = vec![batch, case.c_in];
                shape.extend(&case.spatial);
                let volume = shape.iter().product();
                let input = tensor1(&values(volume, 13 + i as u64)).into_shape(&shape)?;
                let want = run(reference.clone(), &input)?;
                let got = run(convolved.clone(), &input)?;
                assert_eq!(got.shape(), want.shape(), "case {i}, batch {batch}");
                let (got, want) = (got.try_as_plain_ram()?, want.try_as_plain_ram()?);
                for (g, w) in got.as_slice::<f32>()?.iter().zip(want.as_slice::<f32>()?) {
                    assert!(
                        (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                        "case {i}, batch {batch}: {g} against {w}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every convolution and max pooling of the two fixture networks runs directly, on a free
    /// batch axis and on a batch of one (the engine's two CPU plans).
    #[test]
    fn the_fixture_networks_run_directly() -> TractResult<()> {
        // Each convolution is followed by a ReLU, fused into it.
        let convs = if conv_w4_f32().is_some() { 3 } else { 0 };
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
        for (name, shape, pools) in [("image_cnn", vec![3, 64, 64], 2), ("signal_cnn", vec![1, 1024], 1)] {
            for batch in [None, Some(1)] {
                let model = crate::ml::onnx().model_for_path(dir.join(format!("{name}.onnx")))?;
                let n: TDim = match batch {
                    Some(b) => b.to_dim(),
                    None => model.symbols.sym("N").into(),
                };
                let mut dims: TVec<TDim> = tvec![n];
                dims.extend(shape.iter().map(|d| d.to_dim()));
                let model = model.with_input_fact(0, f32::fact(dims).into())?;
                let mut typed = model.into_typed()?.into_decluttered()?;
                assert_eq!(direct(&mut typed)?, 2 * convs + pools, "{name}, batch {batch:?}");
                let typed = typed.into_optimized()?;
                let count = |f: &dyn Fn(&TypedNode) -> bool| typed.nodes().iter().filter(|n| f(n)).count();
                assert_eq!(count(&|n| n.op_is::<DirectConv>()), convs);
                assert_eq!(count(&|n| n.op_is::<DirectMaxPool>()), pools);
            }
        }
        Ok(())
    }

    /// The direct max pooling gives tract's results: windows side by side, overlapping, padded
    /// (`SAME`, explicit, and onnxruntime's ceil mode), rows that leave points over, one and two
    /// spatial axes, a batch of samples, and negative values only.
    #[test]
    fn max_pooling_matches_tracts() -> TractResult<()> {
        // Channels, spatial sizes, kernel, strides, padding.
        type Pool = (usize, Vec<usize>, Vec<usize>, Vec<usize>, PaddingSpec);
        let cases: [Pool; 7] = [
            (8, vec![13, 17], vec![2, 2], vec![2, 2], PaddingSpec::Valid),
            (3, vec![9, 10], vec![3, 3], vec![1, 1], PaddingSpec::SameUpper),
            (
                2,
                vec![11, 12],
                vec![3, 3],
                vec![2, 2],
                PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], true),
            ),
            (
                4,
                vec![7, 9],
                vec![2, 3],
                vec![2, 1],
                PaddingSpec::Explicit(tvec![1, 0], tvec![0, 2]),
            ),
            (16, vec![256], vec![4], vec![4], PaddingSpec::Valid),
            (5, vec![31], vec![3], vec![2], PaddingSpec::Explicit(tvec![1], tvec![1])),
            (1, vec![6], vec![6], vec![1], PaddingSpec::Valid),
        ];
        for (i, (c, spatial, kernel, strides, padding)) in cases.into_iter().enumerate() {
            let make = || -> TractResult<TypedModel> {
                let mut model = TypedModel::default();
                let n = model.symbols.sym("N");
                let mut shape: TVec<TDim> = tvec![n.into(), c.to_dim()];
                shape.extend(spatial.iter().map(|d| d.to_dim()));
                let x = model.add_source("x", f32::fact(shape))?;
                let pool = MaxPool {
                    pool_spec: PoolSpec {
                        data_format: DataFormat::NCHW,
                        kernel_shape: kernel.iter().copied().collect(),
                        padding: padding.clone(),
                        dilations: None,
                        strides: Some(strides.iter().copied().collect()),
                        input_channels: c,
                        output_channels: c,
                    },
                    with_index_outputs: None,
                };
                let y = model.wire_node("pool", pool, &[x])?;
                model.select_output_outlets(&y)?;
                Ok(model)
            };
            let reference = make()?.into_optimized()?;
            let mut pooled = make()?.into_decluttered()?;
            assert_eq!(direct(&mut pooled)?, 1, "case {i}");
            let pooled = pooled.into_optimized()?;
            // A shift of the values; `special`: NaN and -inf here and there.
            for (batch, shift, special) in [
                (1, 0.0, false),
                (3, 0.0, false),
                (2, -2.0, false),
                (2, 0.0, true),
                (1, f32::NEG_INFINITY, false),
            ] {
                let mut shape = vec![batch, c];
                shape.extend(&spatial);
                let volume = shape.iter().product();
                let mut data: Vec<f32> = values(volume, 17 + i as u64).iter().map(|v| v + shift).collect();
                if special {
                    for (j, v) in data.iter_mut().enumerate() {
                        match (j % 7, j % 5) {
                            (3, _) => *v = f32::NAN,
                            (_, 1) => *v = f32::NEG_INFINITY,
                            _ => {}
                        }
                    }
                }
                let input = tensor1(&data).into_shape(&shape)?;
                let want = run(reference.clone(), &input)?;
                let got = run(pooled.clone(), &input)?;
                assert_eq!(got.shape(), want.shape(), "case {i}, batch {batch}");
                let (got, want) = (got.try_as_plain_ram()?, want.try_as_plain_ram()?);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(got.as_slice::<f32>()?),
                    bits(want.as_slice::<f32>()?),
                    "case {i}, batch {batch}, shift {shift}, special {special}"
                );
            }
        }
        Ok(())
    }

    /// A geometry whose padded planes do not fit in memory's range is refused, not wrapped.
    #[test]
    fn huge_paddings_are_refused() {
        let geo = Geometry {
            rank: 2,
            channels: 3,
            input: [64, 64],
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
            after: [1, 1],
            out: [64, 64],
        };
        assert_eq!(geo.sizes(), Some(3 * 66 * 66));
        let huge = Geometry {
            pad: [usize::MAX / 2, 1],
            ..geo.clone()
        };
        assert_eq!(huge.sizes(), None);
        let wide = Geometry {
            after: [1 << 40, 1 << 40],
            ..geo
        };
        assert_eq!(wide.sizes(), None);
    }

    /// Convolutions the direct form does not take (two groups, a dilation) keep tract's lowering.
    #[test]
    fn others_keep_tracts_lowering() -> TractResult<()> {
        for (group, dilation) in [(2, 1), (1, 2)] {
            let case = Case {
                group,
                dilation,
                ..case(4, 4, &[9, 9], &[3, 3], &[1, 1], PaddingSpec::Valid)
            };
            let mut m = model(&case, None)?.into_decluttered()?;
            assert_eq!(direct(&mut m)?, 0);
        }
        Ok(())
    }
}
