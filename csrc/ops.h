#pragma once

// The C++ face of maskray's forward operators (the backward ops are reached
// through autograd only). Each call goes through the dispatcher, so it
// reaches the autocast, autograd (registered from Python), CPU or CUDA kernel
// that fits its arguments.

#include <ATen/ATen.h>

#include <tuple>

namespace maskray {
namespace ops {

at::Tensor roi_align(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width,
    int64_t sampling_ratio,
    bool aligned);

std::tuple<at::Tensor, at::Tensor> roi_pool(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width);

} // namespace ops
} // namespace maskray
