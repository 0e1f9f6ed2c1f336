// CUDA RoIAlign, forward and backward, with torchvision.ops.roi_align's
// semantics. Contiguous and channels_last inputs are read in place through
// their strides (any other layout is made contiguous first); each thread owns
// one output element, taken in the output's memory order so that
// neighbouring threads write neighbouring addresses.

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

// Calls visit(b) with the bilinear neighbours b of every sample of output bin
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
        visit(bilinear(y, x));
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
    acc_t sum = 0;
    for_each_sample(g, o.h, o.w, height, width, [&](const Bilinear<acc_t>& b) {
      const auto v = [&](int j) {
        return static_cast<acc_t>(
            plane[b.row[j] * in_stride.h + b.col[j] * in_stride.w]);
      };
      sum += b.weight[0] * v(0) + b.weight[1] * v(1) + b.weight[2] * v(2) +
          b.weight[3] * v(3);
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
    for_each_sample(g, o.h, o.w, height, width, [&](const Bilinear<acc_t>& b) {
      for (int j = 0; j < 4; ++j) {
        gpuAtomicAdd(
            grad_input + plane + b.row[j] * in_stride.h + b.col[j] * in_stride.w,
            grad_per_sample * b.weight[j]);
      }
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
  check_roi_values_unless_capturing(rois, input.size(0), "roi_align");
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
  const char* op = "roi_align backward";
  check_roi_backward_inputs(grad, rois, channels, pooled_height, pooled_width, op);
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
  check_roi_values_unless_capturing(rois, batch_size, op);

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
