// The CUDA kernels of csrc/cuda, run on the host: the same host side
// (roi_*_launch.cuh) and per-thread bodies (roi_*_body.cuh) as the GPU build,
// compiled by the host compiler, with a Backend that walks every block and
// thread of the grid the GPU launch would have, one after another, and adds
// where the GPU adds atomically. Test-only: tests/test_cuda_kernels_on_host.py
// builds it with torch.utils.cpp_extension.load and calls it through
// torch.ops.maskray_cuda_on_host. Each op takes, beyond the CUDA op's
// arguments:
//   max_blocks  the grid's cap (the GPU's is SMs * resident blocks per SM * 4;
//               1 puts every item through one block's grid-stride loops)
//   reverse     walk the blocks, and the threads of each, in reverse order, a
//               schedule as legal as the forward one: a result that depends on
//               it would vary on a GPU too

#include "cuda/roi_align_launch.cuh"
#include "cuda/roi_pool_launch.cuh"

#include <torch/library.h>

namespace {

using maskray::ops::cuda::grid_blocks;
using maskray::ops::cuda::grid_thread;
using maskray::ops::cuda::GridThread;
using maskray::ops::cuda::kThreads;

struct HostBackend {
  static constexpr bool on_device = false;
  struct Guard {
    explicit Guard(at::Device) {}
  };

  int64_t max_blocks;
  bool reverse;

  static void check_roi_values(
      const at::Tensor& rois, int64_t batch_size, const char* op) {
    maskray::ops::check_roi_values(rois, batch_size, op);
  }
  int64_t blocks(int64_t numel) const {
    return grid_blocks(numel, max_blocks);
  }
  template <typename F>
  void walk(int64_t blocks, F&& f) const {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t t = 0; t < kThreads; ++t) {
        f(reverse ? grid_thread(blocks - 1 - b, kThreads - 1 - t, kThreads, blocks)
                  : grid_thread(b, t, kThreads, blocks));
      }
    }
  }
};

HostBackend backend(int64_t max_blocks, bool reverse) {
  TORCH_CHECK(max_blocks > 0, "max_blocks must be positive");
  return {max_blocks, reverse};
}

at::Tensor roi_align(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
    int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
    bool aligned, int64_t max_blocks, bool reverse) {
  return maskray::ops::cuda::roi_align_forward(
      backend(max_blocks, reverse), input, rois, spatial_scale, pooled_height,
      pooled_width, sampling_ratio, aligned);
}

at::Tensor roi_align_backward(
    const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
    int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
    int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
    bool aligned, int64_t max_blocks, bool reverse) {
  return maskray::ops::cuda::roi_align_backward(
      backend(max_blocks, reverse), grad, rois, spatial_scale, pooled_height,
      pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned);
}

std::tuple<at::Tensor, at::Tensor> roi_pool(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
    int64_t pooled_height, int64_t pooled_width, int64_t max_blocks,
    bool reverse) {
  return maskray::ops::cuda::roi_pool_forward(
      backend(max_blocks, reverse), input, rois, spatial_scale, pooled_height,
      pooled_width);
}

at::Tensor roi_pool_backward(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
    int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
    int64_t channels, int64_t height, int64_t width, int64_t max_blocks,
    bool reverse) {
  return maskray::ops::cuda::roi_pool_backward(
      backend(max_blocks, reverse), grad, rois, argmax, pooled_height,
      pooled_width, batch_size, channels, height, width);
}

} // namespace

TORCH_LIBRARY(maskray_cuda_on_host, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned, int max_blocks, "
      "bool reverse) -> Tensor",
      &roi_align);
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "int pooled_height, int pooled_width, int batch_size, int channels, "
      "int height, int width, int sampling_ratio, bool aligned, int max_blocks, "
      "bool reverse) -> Tensor",
      &roi_align_backward);
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int max_blocks, bool reverse) -> (Tensor, Tensor)",
      &roi_pool);
  m.def(
      "roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, int pooled_height, "
      "int pooled_width, int batch_size, int channels, int height, int width, "
      "int max_blocks, bool reverse) -> Tensor",
      &roi_pool_backward);
}
