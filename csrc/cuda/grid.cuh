#pragma once

// What the CUDA kernels' threads compute, in a form that compiles for the
// device (nvcc) and for the host (nvcc's host pass, or plain g++): the launch
// geometry, 4-D indexing and the gradient add. The kernels' per-thread bodies
// (roi_align_body.cuh, roi_pool_body.cuh) are written against this header
// only, so that tests/cuda_on_host can run every thread of a kernel's grid on
// the CPU, with the indices and arithmetic the GPU executes.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#include <ATen/cuda/Atomic.cuh>
// Force-inlined into the __global__ wrappers, so that the bodies' __restrict__
// pointers and arithmetic are those of one kernel.
#define MASKRAY_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MASKRAY_HOST_DEVICE inline
#endif

namespace maskray {
namespace ops {
namespace cuda {

constexpr int kThreads = 256; // threads per block, in every kernel

// The blocks a kernel over `numel` work items is launched with: one thread per
// item, at most `cap` blocks (a few waves of resident blocks; the grid-stride
// loops cover the rest).
inline int64_t grid_blocks(int64_t numel, int64_t cap) {
  return std::min((numel + kThreads - 1) / kThreads, cap);
}

// One thread of a 1-D grid: its first work item and the grid's stride.
struct GridThread {
  int64_t first;
  int64_t stride;
};

MASKRAY_HOST_DEVICE GridThread grid_thread(
    int64_t block, int64_t thread, int64_t block_dim, int64_t grid_dim) {
  return {block * block_dim + thread, block_dim * grid_dim};
}

#if defined(__CUDACC__)
__device__ __forceinline__ GridThread this_thread() {
  return grid_thread(blockIdx.x, threadIdx.x, blockDim.x, gridDim.x);
}
#endif

// Adds `value` at `address`: an atomic add on the device, where threads run
// at once; a plain add on the host, which runs them one after another.
template <typename T>
MASKRAY_HOST_DEVICE void add_to(T* address, T value) {
#if defined(__CUDA_ARCH__)
  gpuAtomicAdd(address, value);
#else
  *address += value;
#endif
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
MASKRAY_HOST_DEVICE Index4 unravel(
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

MASKRAY_HOST_DEVICE int64_t offset_of(const Index4& i, const Strides4& s) {
  return i.n * s.n + i.c * s.c + i.h * s.h + i.w * s.w;
}

} // namespace cuda
} // namespace ops
} // namespace maskray
