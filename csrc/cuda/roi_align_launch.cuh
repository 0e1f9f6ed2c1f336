#pragma once

// The host side of the CUDA RoIAlign, forward and backward, with
// torchvision.ops.roi_align's semantics: checks, layouts, buffers, the dtype
// dispatch and the launch, for a Backend (launch.cuh) that runs the kernels
// on the GPU (roi_align_kernel.cu) or on the CPU (tests/cuda_on_host).
// Contiguous and channels_last inputs are read in place through their strides
// (any other layout is made contiguous first); each thread owns one output
// element, taken in the output's memory order so that neighbouring threads
// write neighbouring addresses.

#include "../checks.h"
#include "../layout.h"
#include "launch.cuh"
#include "roi_align_body.cuh"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace maskray {
namespace ops {
namespace cuda {

template <typename Backend>
at::Tensor roi_align_forward(
    const Backend& backend,
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  check_roi_op_inputs(input, rois, pooled_height, pooled_width, "roi_align");
  backend.check_roi_values(rois, input.size(0), "roi_align");
  typename Backend::Guard device_guard(input.device());

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
        MASKRAY_RUN_KERNEL(
            backend, backend.blocks(numel), roi_align_forward_cuda<scalar_t>,
            roi_align_forward_body<scalar_t>,
            numel, input_.const_data_ptr<scalar_t>(), strides_of(input_),
            rois_.const_data_ptr<scalar_t>(),
            output.mutable_data_ptr<scalar_t>(), strides_of(output),
            channels, input.size(2), input.size(3), pooled_height,
            pooled_width, static_cast<acc_t>(spatial_scale),
            static_cast<int>(sampling_ratio), aligned,
            layout == at::MemoryFormat::ChannelsLast);
      });
  return output;
}

// Under torch.use_deterministic_algorithms(True) the gradient is gathered by
// rows of grad_input (roi_align_backward_rows_body): the same bits on every
// run. Otherwise it is scattered with atomics, which is faster with many rois.
template <typename Backend>
at::Tensor roi_align_backward(
    const Backend& backend,
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
  typename Backend::Guard device_guard(grad.device());

  const auto layout = layout_of(grad);
  at::Tensor grad_input =
      gradient_buffer(grad, {batch_size, channels, height, width}, layout);
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  // A bad batch index would scatter outside grad_input.
  backend.check_roi_values(rois, batch_size, op);

  const at::Tensor rois_ = rois.contiguous();
  const bool channels_last = layout == at::MemoryFormat::ChannelsLast;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, grad.scalar_type(),
      "roi_align_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (deterministic) {
          const int64_t rows = batch_size * channels * height;
          MASKRAY_RUN_KERNEL(
              backend, backend.blocks(rows),
              roi_align_backward_rows_cuda<scalar_t>,
              roi_align_backward_rows_body<scalar_t>,
              rows, grad.const_data_ptr<scalar_t>(), strides_of(grad),
              rois_.const_data_ptr<scalar_t>(), rois_.size(0),
              grad_input.mutable_data_ptr<acc_t>(), strides_of(grad_input),
              channels, height, width, pooled_height, pooled_width,
              static_cast<acc_t>(spatial_scale),
              static_cast<int>(sampling_ratio), aligned, channels_last);
        } else {
          const int64_t numel = grad.numel();
          MASKRAY_RUN_KERNEL(
              backend, backend.blocks(numel),
              roi_align_backward_cuda<scalar_t>,
              roi_align_backward_body<scalar_t>,
              numel, grad.const_data_ptr<scalar_t>(), strides_of(grad),
              rois_.const_data_ptr<scalar_t>(),
              grad_input.mutable_data_ptr<acc_t>(), strides_of(grad_input),
              channels, height, width, pooled_height, pooled_width,
              static_cast<acc_t>(spatial_scale),
              static_cast<int>(sampling_ratio), aligned, channels_last);
        }
      });
  return grad_input.to(grad.scalar_type());
}

} // namespace cuda
} // namespace ops
} // namespace maskray
