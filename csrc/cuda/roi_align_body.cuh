#pragma once

// What one thread of each CUDA RoIAlign kernel computes, as __host__ __device__
// functions of the thread's place in the grid (GridThread): the __global__
// kernels below are thin wrappers over them, and tests/cuda_on_host runs them
// on the CPU for every thread of the same grid.

#include "../roi_geometry.h"
#include "grid.cuh"

#include <ATen/OpMathType.h>

namespace maskray {
namespace ops {
namespace cuda {

// Calls visit(b) with the bilinear neighbours b of every sample of output bin
// (ph, pw) that lies on the map; samples off the map contribute nothing.
template <typename acc_t, typename Visit>
MASKRAY_HOST_DEVICE void for_each_sample(
    const RoiGrid<acc_t>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    Visit visit) {
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    const AxisTap<acc_t> y = axis_tap(
        sample_coordinate(g.start_h, g.bin_h, ph, iy, g.grid_h), height);
    if (y.lo < 0) {
      continue;
    }
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      const AxisTap<acc_t> x = axis_tap(
          sample_coordinate(g.start_w, g.bin_w, pw, ix, g.grid_w), width);
      if (x.lo >= 0) {
        visit(bilinear(y, x));
      }
    }
  }
}

// Forward: thread items are output elements, in the output's memory order.
template <typename scalar_t>
MASKRAY_HOST_DEVICE void roi_align_forward_body(
    GridThread thread,
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = thread.first; i < numel; i += thread.stride) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const RoiGrid<acc_t> g = roi_grid<scalar_t, acc_t>(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width,
        sampling_ratio, aligned);
    const scalar_t* plane =
        input + g.batch_index * in_stride.n + o.c * in_stride.c;
    acc_t sum = 0;
    for_each_sample(g, o.h, o.w, height, width, [&](const Bilinear<acc_t>& b) {
      const auto v = [&](int j) {
        return static_cast<acc_t>(
            plane[b.row[j] * in_stride.h + b.col[j] * in_stride.w]);
      };
      sum += b.weight[0] * v(0) + b.weight[1] * v(1) + b.weight[2] * v(2) +
          b.weight[3] * v(3);
    });
    output[offset_of(o, out_stride)] = static_cast<scalar_t>(sum / g.count);
  }
}

// Backward, scattering: thread items are elements of grad (the output's
// gradient), each adding its share into the cells its samples read, with
// atomics, so the order of the adds into a cell, and the rounding of its sum,
// vary from run to run.
template <typename scalar_t>
MASKRAY_HOST_DEVICE void roi_align_backward_body(
    GridThread thread,
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = thread.first; i < numel; i += thread.stride) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const RoiGrid<acc_t> g = roi_grid<scalar_t, acc_t>(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width,
        sampling_ratio, aligned);
    // Divided once here rather than per tap (torchvision: grad * w / count);
    // the two differ by rounding only.
    const acc_t grad_per_sample =
        static_cast<acc_t>(grad[offset_of(o, grad_stride)]) / g.count;
    const int64_t plane = g.batch_index * in_stride.n + o.c * in_stride.c;
    for_each_sample(g, o.h, o.w, height, width, [&](const Bilinear<acc_t>& b) {
      for (int j = 0; j < 4; ++j) {
        add_to(
            grad_input + plane + b.row[j] * in_stride.h + b.col[j] * in_stride.w,
            grad_per_sample * b.weight[j]);
      }
    });
  }
}

// Backward, gathering (under torch.use_deterministic_algorithms): thread items
// are rows (n, c, h) of grad_input, in its memory order (n, h, c for
// channels_last). A thread adds into its own row only, so it needs no atomics,
// and it adds what the rois of image n pass to that row in one fixed order,
// the CPU kernel's (roi, bin row, bin column, sample, neighbour): every cell's
// sum is rounded the same way on every run. Each thread visits every roi and
// bin row, so this costs more than the scatter when there are many rois.
template <typename scalar_t>
MASKRAY_HOST_DEVICE void roi_align_backward_rows_body(
    GridThread thread,
    int64_t numel, // batch_size * channels * height
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const scalar_t* __restrict__ rois,
    int64_t num_rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = thread.first; i < numel; i += thread.stride) {
    const Index4 r = unravel(i, channels, height, 1, channels_last);
    acc_t* row = grad_input + r.n * in_stride.n + r.c * in_stride.c +
        r.h * in_stride.h;
    for (int64_t k = 0; k < num_rois; ++k) {
      const scalar_t* roi = rois + k * 5;
      if (static_cast<int64_t>(static_cast<acc_t>(roi[0])) != r.n) {
        continue;
      }
      const RoiGrid<acc_t> g = roi_grid<scalar_t, acc_t>(
          roi, spatial_scale, pooled_height, pooled_width, sampling_ratio,
          aligned);
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        // Bin rows none of whose samples has row h as a neighbour add nothing.
        bool reaches = false;
        for (int64_t iy = 0; iy < g.grid_h && !reaches; ++iy) {
          const AxisTap<acc_t> y = axis_tap(
              sample_coordinate(g.start_h, g.bin_h, ph, iy, g.grid_h), height);
          reaches = y.lo == r.h || y.hi == r.h;
        }
        if (!reaches) {
          continue;
        }
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const acc_t grad_per_sample = static_cast<acc_t>(grad[
              k * grad_stride.n + r.c * grad_stride.c + ph * grad_stride.h +
              pw * grad_stride.w]) / g.count;
          for_each_sample(
              g, ph, pw, height, width, [&](const Bilinear<acc_t>& b) {
                for (int j = 0; j < 4; ++j) {
                  if (b.row[j] == r.h) {
                    row[b.col[j] * in_stride.w] += grad_per_sample * b.weight[j];
                  }
                }
              });
        }
      }
    }
  }
}

#if defined(__CUDACC__)

// The kernels: one GridThread each, over the bodies above.

template <typename scalar_t>
__global__ void roi_align_forward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  roi_align_forward_body<scalar_t>(
      this_thread(), numel, input, in_stride, rois, output, out_stride,
      channels, height, width, pooled_height, pooled_width, spatial_scale,
      sampling_ratio, aligned, channels_last);
}

template <typename scalar_t>
__global__ void roi_align_backward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  roi_align_backward_body<scalar_t>(
      this_thread(), numel, grad, grad_stride, rois, grad_input, in_stride,
      channels, height, width, pooled_height, pooled_width, spatial_scale,
      sampling_ratio, aligned, channels_last);
}

template <typename scalar_t>
__global__ void roi_align_backward_rows_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const scalar_t* __restrict__ rois,
    int64_t num_rois,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  roi_align_backward_rows_body<scalar_t>(
      this_thread(), numel, grad, grad_stride, rois, num_rois, grad_input,
      in_stride, channels, height, width, pooled_height, pooled_width,
      spatial_scale, sampling_ratio, aligned, channels_last);
}

#endif // __CUDACC__

} // namespace cuda
} // namespace ops
} // namespace maskray
