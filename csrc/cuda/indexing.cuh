#pragma once

// Launch geometry, 4-D indexing and checks shared by the CUDA kernels: one
// thread per output element, taken in the output's memory order (channels
// fastest for channels_last) so that neighbouring threads write neighbouring
// addresses, and every tensor read or written through its own strides.

#include "../checks.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include <algorithm>

namespace maskray {
namespace ops {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t numel) {
  // A few waves of resident blocks; the grid-stride loops cover the rest.
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t cap = int64_t{prop->multiProcessorCount} *
      (prop->maxThreadsPerMultiProcessor / kThreads) * 4;
  return std::min(at::ceil_div(numel, int64_t{kThreads}), cap);
}

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Index4 {
  int64_t n, c, h, w;
};

// Splits a linear index taken in NCHW or NHWC order into its coordinates.
__device__ __forceinline__ Index4 unravel(
    int64_t i, int64_t channels, int64_t height, int64_t width,
    bool channels_last) {
  Index4 idx;
  if (channels_last) {
    idx.c = i % channels;
    i /= channels;
    idx.w = i % width;
    i /= width;
    idx.h = i % height;
    idx.n = i / height;
  } else {
    idx.w = i % width;
    i /= width;
    idx.h = i % height;
    i /= height;
    idx.c = i % channels;
    idx.n = i / channels;
  }
  return idx;
}

__device__ __forceinline__ int64_t
offset_of(const Index4& i, const Strides4& s) {
  return i.n * s.n + i.c * s.c + i.h * s.h + i.w * s.w;
}

// check_roi_values synchronises with the device, which a CUDA graph capture
// forbids; a captured call replays the shapes of calls already run, and
// checked, eagerly.
inline void check_roi_values_unless_capturing(
    const at::Tensor& rois, int64_t batch_size, const char* op) {
  if (at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None) {
    check_roi_values(rois, batch_size, op);
  }
}

} // namespace cuda
} // namespace ops
} // namespace maskray
