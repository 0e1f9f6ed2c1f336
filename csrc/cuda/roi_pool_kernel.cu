// CUDA RoIPool, forward and backward: the host side is roi_pool_launch.cuh,
// what each thread computes roi_pool_body.cuh (both also run on the CPU in
// tests/test_cuda_kernels_on_host.py); here they are bound to the GPU.

#include "indexing.cuh"
#include "roi_pool_launch.cuh"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace maskray {
namespace ops {

namespace {

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  return cuda::roi_pool_forward(
      cuda::DeviceBackend{}, input, rois, spatial_scale, pooled_height,
      pooled_width);
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
  return cuda::roi_pool_backward(
      cuda::DeviceBackend{}, grad, rois, argmax, pooled_height, pooled_width,
      batch_size, channels, height, width);
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CUDA, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_kernel));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_kernel));
}

} // namespace ops
} // namespace maskray
