// CUDA RoIPool, forward and backward, with torchvision.ops.roi_pool's
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

template <typename scalar_t>
__global__ void roi_pool_forward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int* __restrict__ argmax,
    Strides4 argmax_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{blockDim.x} * gridDim.x) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const QuantisedRoi<acc_t> roi(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width);
    const PoolBin bin = roi.bin(o.h, o.w, height, width);
    acc_t best = pool_initial_value<acc_t>(bin);
    int best_index = -1;
    const scalar_t* plane =
        input + roi.batch_index * in_stride.n + o.c * in_stride.c;
    for (int64_t h = bin.rows.lo; h < bin.rows.hi; ++h) {
      for (int64_t w = bin.cols.lo; w < bin.cols.hi; ++w) {
        const acc_t v =
            static_cast<acc_t>(plane[h * in_stride.h + w * in_stride.w]);
        // Strict: the first maximum wins, and NaN never does.
        if (v > best) {
          best = v;
          best_index = static_cast<int>(h * width + w);
        }
      }
    }
    output[offset_of(o, out_stride)] = static_cast<scalar_t>(best);
    argmax[offset_of(o, argmax_stride)] = best_index;
  }
}

template <typename scalar_t>
__global__ void roi_pool_backward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const int* __restrict__ argmax,
    Strides4 argmax_stride,
    const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{blockDim.x} * gridDim.x) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const int index = argmax[offset_of(o, argmax_stride)];
    // -1 marks an empty bin; the upper bound keeps an argmax that did not
    // come from the forward from writing out of bounds.
    if (index < 0 || index >= height * width) {
      continue;
    }
    const int64_t batch =
        static_cast<int64_t>(static_cast<acc_t>(rois[o.n * 5]));
    const int64_t h = index / width;
    const int64_t w = index % width;
    gpuAtomicAdd(
        grad_input + batch * in_stride.n + o.c * in_stride.c +
            h * in_stride.h + w * in_stride.w,
        static_cast<acc_t>(grad[offset_of(o, grad_stride)]));
  }
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  check_roi_op_inputs(input, rois, pooled_height, pooled_width, "roi_pool");
  check_roi_values_unless_capturing(rois, input.size(0), "roi_pool");
  const int64_t height = input.size(2);
  const int64_t width = input.size(3);
  check_argmax_range(height, width, "roi_pool");
  at::cuda::CUDAGuard device_guard(input.device());

  const auto layout = layout_of(input);
  const at::Tensor input_ = input.contiguous(layout);
  const at::Tensor rois_ = rois.contiguous();
  const int64_t channels = input.size(1);
  at::Tensor output = at::empty(
      {rois.size(0), channels, pooled_height, pooled_width},
      input.options().memory_format(layout));
  at::Tensor argmax = at::empty(
      output.sizes(),
      input.options().dtype(at::kInt).memory_format(layout));
  if (output.numel() == 0) {
    return {output, argmax};
  }

  const int64_t numel = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(),
      "roi_pool_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        roi_pool_forward_cuda<scalar_t>
            <<<num_blocks(numel), kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                numel, input_.const_data_ptr<scalar_t>(), strides_of(input_),
                rois_.const_data_ptr<scalar_t>(),
                output.mutable_data_ptr<scalar_t>(), strides_of(output),
                argmax.mutable_data_ptr<int>(), strides_of(argmax), channels,
                static_cast<int>(height), static_cast<int>(width),
                pooled_height, pooled_width,
                static_cast<acc_t>(spatial_scale),
                layout == at::MemoryFormat::ChannelsLast);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {output, argmax};
}

at::Tensor roi_pool_backward_kernel(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& argmax,
    double /*spatial_scale: the argmax already says where*/,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width) {
  const char* op = "roi_pool backward";
  check_roi_backward_inputs(grad, rois, channels, pooled_height, pooled_width, op);
  check_roi_pool_argmax(argmax, grad, op);
  check_argmax_range(height, width, op);
  at::globalContext().alertNotDeterministic(
      "maskray::roi_pool_backward (CUDA)");
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
      "roi_pool_backward_cuda", [&] {
        roi_pool_backward_cuda<scalar_t>
            <<<num_blocks(numel), kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                numel, grad.const_data_ptr<scalar_t>(), strides_of(grad),
                argmax.const_data_ptr<int>(), strides_of(argmax),
                rois_.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                strides_of(grad_input), channels,
                static_cast<int>(height), static_cast<int>(width),
                pooled_height, pooled_width,
                layout == at::MemoryFormat::ChannelsLast);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input.to(grad.scalar_type());
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CUDA, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_kernel));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_kernel));
}

} // namespace ops
} // namespace maskray
