// RoIAlign on the CPU: forward and backward, parallel with at::parallel_for.
//
// Two layouts, each with the loop order that keeps its innermost loop simple:
// - contiguous (NCHW): work items are (image, block of kBlock channels), each
//   pooling every roi of its image from planes that stay in cache (see
//   rois_by_image.h); a sample's taps are formed once for the whole block,
//   whose accumulators stay in registers.
// - channels_last (NHWC): work items are (roi, output row); the innermost loop
//   runs over contiguous channels, which the compiler vectorises.
// The backward's items are (image, channel block) in both layouts, so no two
// threads ever add into the same input cell: no atomics, and the same result
// for any number of threads.

#include "../checks.h"
#include "../layout.h"
#include "roi_table.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace maskray {
namespace ops {
namespace {

using cpu::RoiTable;

constexpr int64_t kBlock = 8; // channels per work item, contiguous layout
constexpr int64_t kBlockLast = 32; // channels per backward item, channels_last

// One bin of `block` channels whose planes are `plane_stride` apart (NCHW).
template <int64_t block, typename scalar_t, typename acc_t>
inline void forward_bin_nchw(
    const scalar_t* __restrict in,
    int64_t plane_stride,
    int64_t width,
    const AxisTap<acc_t>* ty,
    int64_t grid_h,
    const AxisTap<acc_t>* tx,
    int64_t grid_w,
    acc_t count,
    scalar_t* __restrict out,
    int64_t out_plane_stride) {
  acc_t acc[block] = {};
  for (int64_t iy = 0; iy < grid_h; ++iy) {
    const AxisTap<acc_t>& y = ty[iy];
    if (y.lo < 0) {
      continue;
    }
    for (int64_t ix = 0; ix < grid_w; ++ix) {
      const AxisTap<acc_t>& x = tx[ix];
      if (x.lo < 0) {
        continue;
      }
      const acc_t w1 = y.w_lo * x.w_lo, w2 = y.w_lo * x.w_hi;
      const acc_t w3 = y.w_hi * x.w_lo, w4 = y.w_hi * x.w_hi;
      const int64_t p1 = y.lo * width + x.lo, p2 = y.lo * width + x.hi;
      const int64_t p3 = y.hi * width + x.lo, p4 = y.hi * width + x.hi;
      for (int64_t c = 0; c < block; ++c) {
        const scalar_t* v = in + c * plane_stride;
        acc[c] += w1 * static_cast<acc_t>(v[p1]) +
            w2 * static_cast<acc_t>(v[p2]) + w3 * static_cast<acc_t>(v[p3]) +
            w4 * static_cast<acc_t>(v[p4]);
      }
    }
  }
  for (int64_t c = 0; c < block; ++c) {
    out[c * out_plane_stride] = static_cast<scalar_t>(acc[c] / count);
  }
}

// The sizes every kernel below needs.
struct Shape {
  int64_t batch, channels, height, width, pooled_height, pooled_width;
};

template <typename scalar_t, typename acc_t>
void forward_nchw(
    const scalar_t* input,
    const RoiTable<acc_t>& table,
    const Shape& s,
    scalar_t* output) {
  const int64_t blocks = (s.channels + kBlock - 1) / kBlock;
  const int64_t plane = s.height * s.width;
  const int64_t out_plane = s.pooled_height * s.pooled_width;
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / blocks;
      const int64_t c0 = (item % blocks) * kBlock;
      const int64_t block = std::min(kBlock, s.channels - c0);
      const scalar_t* in = input + (image * s.channels + c0) * plane;
      for (const int64_t* roi = table.by_image.begin(image);
           roi != table.by_image.end(image);
           ++roi) {
        const int64_t k = *roi;
        const RoiGrid<acc_t>& g = table.grids[k];
        scalar_t* out = output + (k * s.channels + c0) * out_plane;
        for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
          const AxisTap<acc_t>* ty = table.y_taps(k, ph);
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            const AxisTap<acc_t>* tx = table.x_taps(k, pw);
            scalar_t* o = out + ph * s.pooled_width + pw;
            if (block == kBlock) {
              forward_bin_nchw<kBlock>(
                  in, plane, s.width, ty, g.grid_h, tx, g.grid_w, g.count, o,
                  out_plane);
            } else {
              for (int64_t c = 0; c < block; ++c) {
                forward_bin_nchw<1>(
                    in + c * plane, plane, s.width, ty, g.grid_h, tx,
                    g.grid_w, g.count, o + c * out_plane, out_plane);
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_nhwc(
    const scalar_t* input,
    const RoiTable<acc_t>& table,
    const Shape& s,
    scalar_t* output) {
  const int64_t C = s.channels;
  const int64_t num_rois = static_cast<int64_t>(table.grids.size());
  at::parallel_for(
      0, num_rois * s.pooled_height, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc_buffer(C);
        acc_t* __restrict acc = acc_buffer.data();
        for (int64_t item = begin; item < end; ++item) {
          const int64_t k = item / s.pooled_height;
          const int64_t ph = item % s.pooled_height;
          const RoiGrid<acc_t>& g = table.grids[k];
          const scalar_t* in = input + g.batch_index * s.height * s.width * C;
          const AxisTap<acc_t>* ty = table.y_taps(k, ph);
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            const AxisTap<acc_t>* tx = table.x_taps(k, pw);
            std::fill(acc, acc + C, acc_t(0));
            for (int64_t iy = 0; iy < g.grid_h; ++iy) {
              const AxisTap<acc_t>& y = ty[iy];
              if (y.lo < 0) {
                continue;
              }
              for (int64_t ix = 0; ix < g.grid_w; ++ix) {
                const AxisTap<acc_t>& x = tx[ix];
                if (x.lo < 0) {
                  continue;
                }
                const acc_t w1 = y.w_lo * x.w_lo, w2 = y.w_lo * x.w_hi;
                const acc_t w3 = y.w_hi * x.w_lo, w4 = y.w_hi * x.w_hi;
                const scalar_t* __restrict v1 = in + (y.lo * s.width + x.lo) * C;
                const scalar_t* __restrict v2 = in + (y.lo * s.width + x.hi) * C;
                const scalar_t* __restrict v3 = in + (y.hi * s.width + x.lo) * C;
                const scalar_t* __restrict v4 = in + (y.hi * s.width + x.hi) * C;
                for (int64_t c = 0; c < C; ++c) {
                  acc[c] += w1 * static_cast<acc_t>(v1[c]) +
                      w2 * static_cast<acc_t>(v2[c]) +
                      w3 * static_cast<acc_t>(v3[c]) +
                      w4 * static_cast<acc_t>(v4[c]);
                }
              }
            }
            scalar_t* __restrict o = output +
                ((k * s.pooled_height + ph) * s.pooled_width + pw) * C;
            for (int64_t c = 0; c < C; ++c) {
              o[c] = static_cast<scalar_t>(acc[c] / g.count);
            }
          }
        }
      });
}

// Adds one output bin's gradient, spread over its samples, into `block`
// channel planes of grad_input (NCHW).
template <typename acc_t>
inline void backward_bin_nchw(
    const acc_t* g, // gradient of the bin per channel, already / count
    int64_t block,
    const AxisTap<acc_t>* ty,
    int64_t grid_h,
    const AxisTap<acc_t>* tx,
    int64_t grid_w,
    int64_t width,
    acc_t* __restrict grad_in,
    int64_t plane_stride) {
  for (int64_t iy = 0; iy < grid_h; ++iy) {
    const AxisTap<acc_t>& y = ty[iy];
    if (y.lo < 0) {
      continue;
    }
    for (int64_t ix = 0; ix < grid_w; ++ix) {
      const AxisTap<acc_t>& x = tx[ix];
      if (x.lo < 0) {
        continue;
      }
      const acc_t w1 = y.w_lo * x.w_lo, w2 = y.w_lo * x.w_hi;
      const acc_t w3 = y.w_hi * x.w_lo, w4 = y.w_hi * x.w_hi;
      const int64_t p1 = y.lo * width + x.lo, p2 = y.lo * width + x.hi;
      const int64_t p3 = y.hi * width + x.lo, p4 = y.hi * width + x.hi;
      for (int64_t c = 0; c < block; ++c) {
        acc_t* v = grad_in + c * plane_stride;
        v[p1] += w1 * g[c];
        v[p2] += w2 * g[c];
        v[p3] += w3 * g[c];
        v[p4] += w4 * g[c];
      }
    }
  }
}

// Items are (image, channel block): each writes its own planes of
// grad_input, so threads never share a cell.
template <typename scalar_t, typename acc_t>
void backward_nchw(
    const scalar_t* grad, // [K, C, PH, PW] contiguous
    const RoiTable<acc_t>& table,
    const Shape& s,
    acc_t* grad_input) {
  const int64_t blocks = (s.channels + kBlock - 1) / kBlock;
  const int64_t plane = s.height * s.width;
  const int64_t out_plane = s.pooled_height * s.pooled_width;
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t g[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / blocks;
      const int64_t c0 = (item % blocks) * kBlock;
      const int64_t block = std::min(kBlock, s.channels - c0);
      acc_t* gin = grad_input + (image * s.channels + c0) * plane;
      for (const int64_t* roi = table.by_image.begin(image);
           roi != table.by_image.end(image);
           ++roi) {
        const int64_t k = *roi;
        const RoiGrid<acc_t>& rg = table.grids[k];
        const scalar_t* gout = grad + (k * s.channels + c0) * out_plane;
        for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            const int64_t bin = ph * s.pooled_width + pw;
            for (int64_t c = 0; c < block; ++c) {
              g[c] = static_cast<acc_t>(gout[c * out_plane + bin]) / rg.count;
            }
            backward_bin_nchw(
                g, block, table.y_taps(k, ph), rg.grid_h, table.x_taps(k, pw),
                rg.grid_w, s.width, gin, plane);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_nhwc(
    const scalar_t* grad, // [K, C, PH, PW] channels_last
    const RoiTable<acc_t>& table,
    const Shape& s,
    acc_t* grad_input) {
  const int64_t C = s.channels;
  const int64_t blocks = (C + kBlockLast - 1) / kBlockLast;
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t g[kBlockLast];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / blocks;
      const int64_t c0 = (item % blocks) * kBlockLast;
      const int64_t block = std::min(kBlockLast, C - c0);
      acc_t* gin = grad_input + image * s.height * s.width * C + c0;
      for (const int64_t* roi = table.by_image.begin(image);
           roi != table.by_image.end(image);
           ++roi) {
        const int64_t k = *roi;
        const RoiGrid<acc_t>& rg = table.grids[k];
        for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
          const AxisTap<acc_t>* ty = table.y_taps(k, ph);
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            const AxisTap<acc_t>* tx = table.x_taps(k, pw);
            const scalar_t* gout = grad +
                ((k * s.pooled_height + ph) * s.pooled_width + pw) * C + c0;
            for (int64_t c = 0; c < block; ++c) {
              g[c] = static_cast<acc_t>(gout[c]) / rg.count;
            }
            for (int64_t iy = 0; iy < rg.grid_h; ++iy) {
              const AxisTap<acc_t>& y = ty[iy];
              if (y.lo < 0) {
                continue;
              }
              for (int64_t ix = 0; ix < rg.grid_w; ++ix) {
                const AxisTap<acc_t>& x = tx[ix];
                if (x.lo < 0) {
                  continue;
                }
                const acc_t w1 = y.w_lo * x.w_lo, w2 = y.w_lo * x.w_hi;
                const acc_t w3 = y.w_hi * x.w_lo, w4 = y.w_hi * x.w_hi;
                acc_t* __restrict v1 = gin + (y.lo * s.width + x.lo) * C;
                acc_t* __restrict v2 = gin + (y.lo * s.width + x.hi) * C;
                acc_t* __restrict v3 = gin + (y.hi * s.width + x.lo) * C;
                acc_t* __restrict v4 = gin + (y.hi * s.width + x.hi) * C;
                // Taps can coincide at the map's edge (lo == hi), so the four
                // rows are updated one after another, never fused.
                for (int64_t c = 0; c < block; ++c) {
                  v1[c] += w1 * g[c];
                }
                for (int64_t c = 0; c < block; ++c) {
                  v2[c] += w2 * g[c];
                }
                for (int64_t c = 0; c < block; ++c) {
                  v3[c] += w3 * g[c];
                }
                for (int64_t c = 0; c < block; ++c) {
                  v4[c] += w4 * g[c];
                }
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  check_roi_op_inputs(input, rois, pooled_height, pooled_width, "roi_align");
  check_roi_batch_indices(rois, input.size(0), "roi_align");
  const at::MemoryFormat layout = layout_of(input);
  const int64_t num_rois = rois.size(0);
  const int64_t channels = input.size(1);
  const int64_t height = input.size(2);
  const int64_t width = input.size(3);
  // Every element is written below, so no zero fill.
  at::Tensor output = at::empty(
      {num_rois, channels, pooled_height, pooled_width},
      input.options().memory_format(layout));
  if (output.numel() == 0) {
    return output;
  }
  if (height == 0 || width == 0) {
    return output.zero_(); // nothing to sample
  }
  const at::Tensor in = input.contiguous(layout);
  const at::Tensor r = rois.contiguous();
  const Shape shape{input.size(0), channels, height, width, pooled_height, pooled_width};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const RoiTable<acc_t> table(
            r.const_data_ptr<scalar_t>(), num_rois, shape.batch, spatial_scale,
            pooled_height, pooled_width, sampling_ratio, aligned, height, width);
        auto run = layout == at::MemoryFormat::ChannelsLast
            ? forward_nhwc<scalar_t, acc_t>
            : forward_nchw<scalar_t, acc_t>;
        run(in.const_data_ptr<scalar_t>(), table, shape,
            output.mutable_data_ptr<scalar_t>());
      });
  return output;
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
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(1) == channels &&
          grad.size(2) == pooled_height && grad.size(3) == pooled_width,
      "roi_align backward: grad must have shape [K, ", channels, ", ",
      pooled_height, ", ", pooled_width, "], got ", grad.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5 && rois.size(0) == grad.size(0),
      "roi_align backward: rois must have shape [", grad.size(0),
      ", 5], got ", rois.sizes());
  TORCH_CHECK(
      grad.scalar_type() == rois.scalar_type(),
      "roi_align backward: grad and rois must have the same dtype, got ",
      grad.scalar_type(), " and ", rois.scalar_type());
  const at::MemoryFormat layout = layout_of(grad);
  at::Tensor grad_input =
      gradient_buffer(grad, {batch_size, channels, height, width}, layout);
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  check_roi_batch_indices(rois, batch_size, "roi_align backward");
  const at::Tensor g = grad.contiguous(layout);
  const at::Tensor r = rois.contiguous();
  const Shape shape{batch_size, channels, height, width, pooled_height, pooled_width};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const RoiTable<acc_t> table(
            r.const_data_ptr<scalar_t>(), r.size(0), batch_size, spatial_scale,
            pooled_height, pooled_width, sampling_ratio, aligned, height, width);
        auto run = layout == at::MemoryFormat::ChannelsLast
            ? backward_nhwc<scalar_t, acc_t>
            : backward_nchw<scalar_t, acc_t>;
        run(g.const_data_ptr<scalar_t>(), table, shape,
            grad_input.mutable_data_ptr<acc_t>());
      });
  return grad_input.to(grad.scalar_type());
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
}

} // namespace ops
} // namespace maskray
