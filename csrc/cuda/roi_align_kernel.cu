// CUDA RoIAlign, forward and backward, with torchvision.ops.roi_align's
// semantics. NCHW and channels_last inputs are both read in place through
// their strides; each thread owns one output element, taken in the output's
// memory order so that neighbouring threads write neighbouring addresses.

#include "../checks.h"
#include "../layout.h"
#include "../roi_geometry.h"
#include "indexing.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace maskray {
namespace ops {

namespace {

using namespace cuda; // indexing.cuh

// Calls visit(y, x) with the per-axis taps of every sample of output bin
// (ph, pw) that lies on the map; samples off the map contribute nothing.
template <typename acc_t, typename Visit>
__device__ __forceinline__ void for_each_sample(
    const RoiGrid<acc_t>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    Visit visit) {
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    const AxisTap<acc_t> y = axis_tap(
        sample_coordinate(g.start_h, g.bin_h, ph, iy, g.grid_h), height);
    if (y.lo < 0) {
      continue;
    }
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      const AxisTap<acc_t> x = axis_tap(
          sample_coordinate(g.start_w, g.bin_w, pw, ix, g.grid_w), width);
      if (x.lo >= 0) {
        visit(y, x);
      }
    }
  }
}

template <typename scalar_t>
__global__ void roi_align_forward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{blockDim.x} * gridDim.x) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const RoiGrid<acc_t> g = roi_grid<scalar_t, acc_t>(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width,
        sampling_ratio, aligned);
    const scalar_t* plane =
        input + g.batch_index * in_stride.n + o.c * in_stride.c;
    const auto v = [&](int64_t h, int64_t w) {
      return static_cast<acc_t>(plane[h * in_stride.h + w * in_stride.w]);
    };

    acc_t sum = 0;
    for_each_sample(
        g, o.h, o.w, height, width,
        [&](const AxisTap<acc_t>& y, const AxisTap<acc_t>& x) {
          sum += y.w_lo * x.w_lo * v(y.lo, x.lo) +
              y.w_lo * x.w_hi * v(y.lo, x.hi) +
              y.w_hi * x.w_lo * v(y.hi, x.lo) + y.w_hi * x.w_hi * v(y.hi, x.hi);
        });
    output[offset_of(o, out_stride)] = static_cast<scalar_t>(sum / g.count);
  }
}

template <typename scalar_t>
__global__ void roi_align_backward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{blockDim.x} * gridDim.x) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const RoiGrid<acc_t> g = roi_grid<scalar_t, acc_t>(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width,
        sampling_ratio, aligned);
    // Divided once here rather than per tap (torchvision: grad * w / count);
    // the two differ by rounding only.
    const acc_t grad_per_sample =
        static_cast<acc_t>(grad[offset_of(o, grad_stride)]) / g.count;
    const int64_t plane = g.batch_index * in_stride.n + o.c * in_stride.c;
    const auto add = [&](int64_t h, int64_t w, acc_t weight) {
      gpuAtomicAdd(
          grad_input + plane + h * in_stride.h + w * in_stride.w,
          grad_per_sample * weight);
    };

    for_each_sample(
        g, o.h, o.w, height, width,
        [&](const AxisTap<acc_t>& y, const AxisTap<acc_t>& x) {
          add(y.lo, x.lo, y.w_lo * x.w_lo);
          add(y.lo, x.hi, y.w_lo * x.w_hi);
          add(y.hi, x.lo, y.w_hi * x.w_lo);
          add(y.hi, x.hi, y.w_hi * x.w_hi);
        });
  }
}

at::Tensor roi_align_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  check_roi_op_inputs(input, rois, pooled_height, pooled_width, "roi_align");
  check_roi_batch_indices(rois, input.size(0), "roi_align");
  at::cuda::CUDAGuard device_guard(input.device());

  const auto layout = layout_of(input);
  const at::Tensor input_ = input.contiguous(layout);
  const at::Tensor rois_ = rois.contiguous();
  const int64_t channels = input.size(1);
  at::Tensor output = at::empty(
      {rois.size(0), channels, pooled_height, pooled_width},
      input.options().memory_format(layout));
  if (output.numel() == 0) {
    return output;
  }
  // A map without cells has nothing to sample (and the border clamp would
  // index cell -1).
  if (input.numel() == 0) {
    return output.zero_();
  }

  const int64_t numel = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(),
      "roi_align_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        roi_align_forward_cuda<scalar_t>
            <<<num_blocks(numel), kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                numel, input_.const_data_ptr<scalar_t>(), strides_of(input_),
                rois_.const_data_ptr<scalar_t>(),
                output.mutable_data_ptr<scalar_t>(), strides_of(output),
                channels, input.size(2), input.size(3), pooled_height,
                pooled_width, static_cast<acc_t>(spatial_scale),
                static_cast<int>(sampling_ratio), aligned,
                layout == at::MemoryFormat::ChannelsLast);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

at::Tensor roi_align_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t sampling_ratio,
    bool aligned) {
  TORCH_CHECK(
      grad.dim() == 4,
      "roi_align backward: grad must be a 4-D tensor (K, C, PH, PW), got ",
      grad.dim(), "-D with shape ", grad.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5,
      "roi_align backward: rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK(
      grad.sizes().equals(
          {rois.size(0), channels, pooled_height, pooled_width}),
      "roi_align backward: grad must have shape [K, channels, pooled_height, "
      "pooled_width] = [",
      rois.size(0), ", ", channels, ", ", pooled_height, ", ", pooled_width,
      "], got ", grad.sizes());
  TORCH_CHECK(
      grad.device() == rois.device(),
      "roi_align backward: grad and rois must be on the same device, got ",
      grad.device(), " and ", rois.device());
  TORCH_CHECK(
      grad.scalar_type() == rois.scalar_type(),
      "roi_align backward: grad and rois must have the same dtype, got ",
      grad.scalar_type(), " and ", rois.scalar_type());
  at::globalContext().alertNotDeterministic(
      "maskray::roi_align_backward (CUDA)");
  at::cuda::CUDAGuard device_guard(grad.device());

  const auto layout = layout_of(grad);
  at::Tensor grad_input =
      gradient_buffer(grad, {batch_size, channels, height, width}, layout);
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  // A bad batch index would scatter outside grad_input.
  check_roi_batch_indices(rois, batch_size, "roi_align backward");

  const at::Tensor rois_ = rois.contiguous();
  const int64_t numel = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, grad.scalar_type(),
      "roi_align_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        roi_align_backward_cuda<scalar_t>
            <<<num_blocks(numel), kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                numel, grad.const_data_ptr<scalar_t>(), strides_of(grad),
                rois_.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                strides_of(grad_input), channels, height,
                width, pooled_height, pooled_width,
                static_cast<acc_t>(spatial_scale),
                static_cast<int>(sampling_ratio), aligned,
                layout == at::MemoryFormat::ChannelsLast);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input.to(grad.scalar_type());
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
}

} // namespace ops
} // namespace maskray
