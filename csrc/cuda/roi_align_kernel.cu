// CUDA RoIAlign, forward and backward: the host side is roi_align_launch.cuh,
// what each thread computes roi_align_body.cuh (both also run on the CPU in
// tests/test_cuda_kernels_on_host.py); here they are bound to the GPU.

#include "indexing.cuh"
#include "roi_align_launch.cuh"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace maskray {
namespace ops {

namespace {

at::Tensor roi_align_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  return cuda::roi_align_forward(
      cuda::DeviceBackend{}, input, rois, spatial_scale, pooled_height,
      pooled_width, sampling_ratio, aligned);
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
  return cuda::roi_align_backward(
      cuda::DeviceBackend{}, grad, rois, spatial_scale, pooled_height,
      pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned);
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
}

} // namespace ops
} // namespace maskray
