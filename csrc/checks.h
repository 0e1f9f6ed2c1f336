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

// Every roi's batch index must name an image of the batch (a whole number:
// torchvision would truncate 0.5 to 0, we say it is wrong) and its corners
// must be finite. On CUDA this costs one device synchronisation: the price of
// a clear error instead of an illegal memory access.
inline void check_roi_values(
    const at::Tensor& rois, int64_t batch_size, const char* op) {
  if (rois.size(0) == 0) {
    return;
  }
  const auto index = rois.select(1, 0);
  const auto bad_index = at::logical_or(
      at::logical_or(index < 0, index >= batch_size), index != index.trunc());
  const auto bad_corner =
      at::logical_not(at::isfinite(rois.narrow(1, 1, 4))).any(1);
  const auto bad = at::logical_or(bad_index, bad_corner).nonzero();
  if (bad.size(0) == 0) {
    return;
  }
  const int64_t k = bad[0][0].item<int64_t>();
  const auto roi = rois[k].to(at::kDouble).cpu();
  const double* r = roi.const_data_ptr<double>();
  TORCH_CHECK(
      !bad_index[k].item<bool>(),
      op, ": rois[", k, ", 0] = ", r[0],
      " is not a batch index of the input, whose batch size is ", batch_size);
  TORCH_CHECK(
      false,
      op, ": rois[", k, "] = (", r[0], ", ", r[1], ", ", r[2], ", ", r[3],
      ", ", r[4], ") has a corner that is not finite");
}

// The arguments of a backward op, which only the autograd formula in model/ops
// calls, checked all the same: a direct call must not write out of bounds.
inline void check_roi_backward_inputs(
    const at::Tensor& grad,
    const at::Tensor& rois,
    int64_t channels,
    int64_t pooled_height,
    int64_t pooled_width,
    const char* op) {
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5,
      op, ": rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == rois.size(0) &&
          grad.size(1) == channels && grad.size(2) == pooled_height &&
          grad.size(3) == pooled_width,
      op, ": grad must have shape [", rois.size(0), ", ", channels, ", ",
      pooled_height, ", ", pooled_width, "], got ", grad.sizes());
  TORCH_CHECK(
      grad.device() == rois.device(),
      op, ": grad and rois must be on the same device, got ", grad.device(),
      " and ", rois.device());
  TORCH_CHECK(
      grad.scalar_type() == rois.scalar_type(),
      op, ": grad and rois must have the same dtype, got ", grad.scalar_type(),
      " and ", rois.scalar_type());
}

inline void check_roi_pool_argmax(
    const at::Tensor& argmax, const at::Tensor& grad, const char* op) {
  TORCH_CHECK(
      argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt &&
          argmax.device() == grad.device(),
      op, ": argmax must be an int32 tensor of grad's shape ", grad.sizes(),
      " on ", grad.device(), ", got ", argmax.scalar_type(), " ",
      argmax.sizes(), " on ", argmax.device());
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
