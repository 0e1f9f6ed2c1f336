#pragma once

// What the CUDA kernels need of the device itself: the grid size from its
// properties, its stream, and the value checks that must not run inside a
// CUDA graph capture. Everything a thread computes is in grid.cuh: one thread
// per output element, taken in the output's memory order (channels fastest
// for channels_last) so that neighbouring threads write neighbouring
// addresses, and every tensor read or written through its own strides.

#include "../checks.h"
#include "grid.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace maskray {
namespace ops {
namespace cuda {

inline int64_t num_blocks(int64_t numel) {
  // A few waves of resident blocks; the grid-stride loops cover the rest.
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t cap = int64_t{prop->multiProcessorCount} *
      (prop->maxThreadsPerMultiProcessor / kThreads) * 4;
  return grid_blocks(numel, cap);
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

// launch.cuh's Backend for the GPU: the current device and stream.
struct DeviceBackend {
  static constexpr bool on_device = true;
  using Guard = at::cuda::CUDAGuard;
  static void check_roi_values(
      const at::Tensor& rois, int64_t batch_size, const char* op) {
    check_roi_values_unless_capturing(rois, batch_size, op);
  }
  static int64_t blocks(int64_t numel) {
    return num_blocks(numel);
  }
};

} // namespace cuda
} // namespace ops
} // namespace maskray
