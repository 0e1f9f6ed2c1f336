#pragma once

// Argument checks shared by every kernel (CPU and CUDA), so that a bad call gets
// the same clear message whichever device it lands on, never a crash or an
// out-of-bounds read.

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace maskray {
namespace ops {

// Checks the shapes, devices and dtypes of an RoI op's inputs. `op` names the
// operator in messages.
inline void check_roi_op_inputs(
    const at::Tensor& input,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    const char* op) {
  TORCH_CHECK(
      input.dim() == 4,
      op, ": input must be a 4-D tensor (N, C, H, W), got ", input.dim(),
      "-D with shape ", input.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5,
      op, ": rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got ",
      rois.sizes());
  TORCH_CHECK(
      input.device() == rois.device(),
      op, ": input and rois must be on the same device, got input on ",
      input.device(), " and rois on ", rois.device());
  TORCH_CHECK(
      input.scalar_type() == rois.scalar_type(),
      op, ": input and rois must have the same dtype, got input ",
      input.scalar_type(), " and rois ", rois.scalar_type());
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      op, ": input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(
      pooled_height > 0 && pooled_width > 0,
      op, ": output_size must be positive, got (", pooled_height, ", ",
      pooled_width, ")");
}

// Every roi's batch index must name an image of the batch. On CUDA this costs
// one device synchronisation: the price of a clear error instead of an illegal
// memory access.
inline void check_roi_batch_indices(
    const at::Tensor& rois, int64_t batch_size, const char* op) {
  if (rois.size(0) == 0) {
    return;
  }
  auto index = rois.select(1, 0);
  auto bad = at::logical_or(
                 at::logical_or(index < 0, index >= batch_size),
                 index != index.trunc())
                 .nonzero();
  if (bad.size(0) > 0) {
    const int64_t k = bad[0][0].item<int64_t>();
    TORCH_CHECK(
        false,
        op, ": rois[", k, ", 0] = ", rois[k][0].item<double>(),
        " is not a batch index of the input, whose batch size is ", batch_size);
  }
}

// RoIPool's argmax holds flat h * W + w cell indices in int32.
inline void check_argmax_range(int64_t height, int64_t width, const char* op) {
  TORCH_CHECK(
      height * width <= std::numeric_limits<int32_t>::max(),
      op, ": the feature map is too large for int32 argmax indices (",
      height, " x ", width, " cells)");
}

} // namespace ops
} // namespace maskray
