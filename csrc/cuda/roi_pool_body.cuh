#pragma once

// What one thread of each CUDA RoIPool kernel computes, as __host__ __device__
// functions of the thread's place in the grid (GridThread): the __global__
// kernels below are thin wrappers over them, and tests/cuda_on_host runs them
// on the CPU for every thread of the same grid.

#include "../roi_geometry.h"
#include "grid.cuh"

#include <ATen/OpMathType.h>

namespace maskray {
namespace ops {
namespace cuda {

// Forward: thread items are output elements, in the output's memory order.
template <typename scalar_t>
MASKRAY_HOST_DEVICE void roi_pool_forward_body(
    GridThread thread,
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int* __restrict__ argmax,
    Strides4 argmax_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = thread.first; i < numel; i += thread.stride) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const QuantisedRoi<acc_t> roi(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width);
    const PoolBin bin = roi.bin(o.h, o.w, height, width);
    acc_t best = pool_initial_value<acc_t>(bin);
    int best_index = -1;
    const scalar_t* plane =
        input + roi.batch_index * in_stride.n + o.c * in_stride.c;
    for (int64_t h = bin.rows.lo; h < bin.rows.hi; ++h) {
      for (int64_t w = bin.cols.lo; w < bin.cols.hi; ++w) {
        const acc_t v =
            static_cast<acc_t>(plane[h * in_stride.h + w * in_stride.w]);
        // Strict: the first maximum wins, and NaN never does.
        if (v > best) {
          best = v;
          best_index = static_cast<int>(h * width + w);
        }
      }
    }
    output[offset_of(o, out_stride)] = static_cast<scalar_t>(best);
    argmax[offset_of(o, argmax_stride)] = best_index;
  }
}

// Backward, scattering: thread items are elements of grad, each adding into
// its bin's argmax cell with an atomic, so the order of the adds into a cell,
// and the rounding of its sum, vary from run to run.
template <typename scalar_t>
MASKRAY_HOST_DEVICE void roi_pool_backward_body(
    GridThread thread,
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const int* __restrict__ argmax,
    Strides4 argmax_stride,
    const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = thread.first; i < numel; i += thread.stride) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const int index = argmax[offset_of(o, argmax_stride)];
    // -1 marks an empty bin; the upper bound keeps an argmax that did not
    // come from the forward from writing out of bounds.
    if (index < 0 || index >= height * width) {
      continue;
    }
    const int64_t batch =
        static_cast<int64_t>(static_cast<acc_t>(rois[o.n * 5]));
    const int64_t h = index / width;
    const int64_t w = index % width;
    add_to(
        grad_input + batch * in_stride.n + o.c * in_stride.c +
            h * in_stride.h + w * in_stride.w,
        static_cast<acc_t>(grad[offset_of(o, grad_stride)]));
  }
}

// Backward, gathering (under torch.use_deterministic_algorithms): thread items
// are rows (n, c, h) of grad_input, in its memory order (n, h, c for
// channels_last). A thread adds into its own row only, without atomics, the
// grads of the bins of image n's rois whose argmax lies on that row, in one
// fixed order, the CPU kernel's (roi, bin): every cell's sum is rounded the
// same way on every run. Each thread reads the argmax of every bin of its
// image's rois, so this costs more than the scatter when there are many rois.
template <typename scalar_t>
MASKRAY_HOST_DEVICE void roi_pool_backward_rows_body(
    GridThread thread,
    int64_t numel, // batch_size * channels * height
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const int* __restrict__ argmax,
    Strides4 argmax_stride,
    const scalar_t* __restrict__ rois,
    int64_t num_rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = thread.first; i < numel; i += thread.stride) {
    const Index4 r = unravel(i, channels, height, 1, channels_last);
    acc_t* row = grad_input + r.n * in_stride.n + r.c * in_stride.c +
        r.h * in_stride.h;
    for (int64_t k = 0; k < num_rois; ++k) {
      if (static_cast<int64_t>(static_cast<acc_t>(rois[k * 5])) != r.n) {
        continue;
      }
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const Index4 o{k, r.c, ph, pw};
          const int index = argmax[offset_of(o, argmax_stride)];
          // As in the scatter: -1 (an empty bin) and indices off the map add
          // nothing.
          if (index < 0 || index >= height * width || index / width != r.h) {
            continue;
          }
          row[(index % width) * in_stride.w] +=
              static_cast<acc_t>(grad[offset_of(o, grad_stride)]);
        }
      }
    }
  }
}

#if defined(__CUDACC__)

// The kernels: one GridThread each, over the bodies above.

template <typename scalar_t>
__global__ void roi_pool_forward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int* __restrict__ argmax,
    Strides4 argmax_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    bool channels_last) {
  roi_pool_forward_body<scalar_t>(
      this_thread(), numel, input, in_stride, rois, output, out_stride, argmax,
      argmax_stride, channels, height, width, pooled_height, pooled_width,
      spatial_scale, channels_last);
}

template <typename scalar_t>
__global__ void roi_pool_backward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const int* __restrict__ argmax,
    Strides4 argmax_stride,
    const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last) {
  roi_pool_backward_body<scalar_t>(
      this_thread(), numel, grad, grad_stride, argmax, argmax_stride, rois,
      grad_input, in_stride, channels, height, width, pooled_height,
      pooled_width, channels_last);
}

template <typename scalar_t>
__global__ void roi_pool_backward_rows_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const int* __restrict__ argmax,
    Strides4 argmax_stride,
    const scalar_t* __restrict__ rois,
    int64_t num_rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int height,
    int width,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last) {
  roi_pool_backward_rows_body<scalar_t>(
      this_thread(), numel, grad, grad_stride, argmax, argmax_stride, rois,
      num_rois, grad_input, in_stride, channels, height, width, pooled_height,
      pooled_width, channels_last);
}

#endif // __CUDACC__

} // namespace cuda
} // namespace ops
} // namespace maskray
