// RoIAlign on the CPU: forward and backward, parallel with at::parallel_for.
//
// Two layouts, each with the loop order that keeps its innermost loop simple:
// - contiguous (NCHW): work items are (block of kBlock channels, image), each
//   pooling every roi of its image from planes that stay in cache (see
//   rois_by_image.h); a sample's taps are formed once for the whole block,
//   whose accumulators stay in registers.
// - channels_last (NHWC): work items are (roi, output row); the innermost loop
//   runs over contiguous channels, which the compiler vectorises.
// The backward's items are (channel block, image) in both layouts, so no two
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

using cpu::block_items;
using cpu::BlockItem;
using cpu::for_each_sample;
using cpu::RoiTable;

constexpr int64_t kBlock = 8; // channels per work item, contiguous layout
constexpr int64_t kBlockLast = 32; // channels per backward item, channels_last

// The sizes every kernel below needs.
struct Shape {
  int64_t batch, channels, height, width, pooled_height, pooled_width;
};

// One bin of `block` channels whose planes are `plane_stride` apart (NCHW).
template <int64_t block, typename scalar_t, typename acc_t>
inline void forward_bin_nchw(
    const scalar_t* __restrict in,
    int64_t plane_stride,
    const RoiTable<acc_t>& table,
    int64_t k,
    int64_t ph,
    int64_t pw,
    int64_t width,
    scalar_t* __restrict out,
    int64_t out_plane_stride) {
  const RoiGrid<acc_t>& g = table.grids[k];
  acc_t acc[block] = {};
  for_each_sample(
      table.y_taps(k, ph), g.grid_h, table.x_taps(k, pw), g.grid_w,
      [&](const Bilinear<acc_t>& b) {
        int64_t cell[4];
        for (int j = 0; j < 4; ++j) {
          cell[j] = b.row[j] * width + b.col[j];
        }
        for (int64_t c = 0; c < block; ++c) {
          const scalar_t* v = in + c * plane_stride;
          acc[c] += b.weight[0] * static_cast<acc_t>(v[cell[0]]) +
              b.weight[1] * static_cast<acc_t>(v[cell[1]]) +
              b.weight[2] * static_cast<acc_t>(v[cell[2]]) +
              b.weight[3] * static_cast<acc_t>(v[cell[3]]);
        }
      });
  for (int64_t c = 0; c < block; ++c) {
    out[c * out_plane_stride] = static_cast<scalar_t>(acc[c] / g.count);
  }
}

template <typename scalar_t, typename acc_t>
void forward_nchw(
    const scalar_t* input,
    const RoiTable<acc_t>& table,
    const Shape& s,
    scalar_t* output) {
  const int64_t plane = s.height * s.width;
  const int64_t out_plane = s.pooled_height * s.pooled_width;
  const int64_t items = block_items(s.batch, kBlock, s.channels);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const BlockItem it(item, s.batch, kBlock, s.channels);
      const scalar_t* in = input + (it.image * s.channels + it.c0) * plane;
      for (const int64_t* roi = table.by_image.begin(it.image);
           roi != table.by_image.end(it.image);
           ++roi) {
        const int64_t k = *roi;
        scalar_t* out = output + (k * s.channels + it.c0) * out_plane;
        for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            scalar_t* o = out + ph * s.pooled_width + pw;
            if (it.block == kBlock) {
              forward_bin_nchw<kBlock>(
                  in, plane, table, k, ph, pw, s.width, o, out_plane);
            } else {
              for (int64_t c = 0; c < it.block; ++c) {
                forward_bin_nchw<1>(
                    in + c * plane, plane, table, k, ph, pw, s.width,
                    o + c * out_plane, out_plane);
              }
            }
          }
        }
      }
    }
  });
}

// Items are (roi, output row); the innermost loop runs over contiguous channels.
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
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            std::fill(acc, acc + C, acc_t(0));
            for_each_sample(
                table.y_taps(k, ph), g.grid_h, table.x_taps(k, pw), g.grid_w,
                [&](const Bilinear<acc_t>& b) {
                  const auto at = [&](int j) {
                    return in + (b.row[j] * s.width + b.col[j]) * C;
                  };
                  const acc_t w1 = b.weight[0], w2 = b.weight[1];
                  const acc_t w3 = b.weight[2], w4 = b.weight[3];
                  const scalar_t* __restrict v1 = at(0);
                  const scalar_t* __restrict v2 = at(1);
                  const scalar_t* __restrict v3 = at(2);
                  const scalar_t* __restrict v4 = at(3);
                  for (int64_t c = 0; c < C; ++c) {
                    acc[c] += w1 * static_cast<acc_t>(v1[c]) +
                        w2 * static_cast<acc_t>(v2[c]) +
                        w3 * static_cast<acc_t>(v3[c]) +
                        w4 * static_cast<acc_t>(v4[c]);
                  }
                });
            scalar_t* __restrict o = output +
                ((k * s.pooled_height + ph) * s.pooled_width + pw) * C;
            for (int64_t c = 0; c < C; ++c) {
              o[c] = static_cast<scalar_t>(acc[c] / g.count);
            }
          }
        }
      });
}

// Adds each bin's gradient, spread over its samples, into grad_input (which,
// like grad, is contiguous or channels_last). Items are (channel block,
// image): each writes its own channels of one image, so threads never share a
// cell.
template <bool channels_last, typename scalar_t, typename acc_t>
void backward(
    const scalar_t* grad,
    const RoiTable<acc_t>& table,
    const Shape& s,
    acc_t* grad_input) {
  constexpr int64_t block_size = channels_last ? kBlockLast : kBlock;
  const int64_t C = s.channels, cells = s.height * s.width;
  const int64_t bins = s.pooled_height * s.pooled_width;
  // Strides of grad's channel and bin, and of grad_input's channel and cell.
  const int64_t grad_c = channels_last ? 1 : bins;
  const int64_t grad_bin = channels_last ? C : 1;
  const int64_t in_c = channels_last ? 1 : cells;
  const int64_t in_cell = channels_last ? C : 1;
  const int64_t items = block_items(s.batch, block_size, C);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    acc_t g[block_size];
    for (int64_t item = begin; item < end; ++item) {
      const BlockItem it(item, s.batch, block_size, C);
      acc_t* gin = grad_input + it.image * C * cells + it.c0 * in_c;
      for (const int64_t* roi = table.by_image.begin(it.image);
           roi != table.by_image.end(it.image);
           ++roi) {
        const int64_t k = *roi;
        const RoiGrid<acc_t>& rg = table.grids[k];
        const scalar_t* gout = grad + k * C * bins + it.c0 * grad_c;
        for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
          for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
            const int64_t bin = ph * s.pooled_width + pw;
            for (int64_t c = 0; c < it.block; ++c) {
              g[c] = static_cast<acc_t>(gout[c * grad_c + bin * grad_bin]) /
                  rg.count;
            }
            for_each_sample(
                table.y_taps(k, ph), rg.grid_h, table.x_taps(k, pw),
                rg.grid_w, [&](const Bilinear<acc_t>& b) {
                  // Neighbours coincide at the map's edge (lo == hi), so each
                  // is added in turn, never fused.
                  for (int j = 0; j < 4; ++j) {
                    const int64_t cell = b.row[j] * s.width + b.col[j];
                    acc_t* v = gin + cell * in_cell;
                    const acc_t w = b.weight[j];
                    for (int64_t c = 0; c < it.block; ++c) {
                      v[c * in_c] += w * g[c];
                    }
                  }
                });
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
  check_roi_values(rois, input.size(0), "roi_align");
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
  check_roi_backward_inputs(
      grad, rois, channels, pooled_height, pooled_width, "roi_align backward");
  const at::MemoryFormat layout = layout_of(grad);
  at::Tensor grad_input =
      gradient_buffer(grad, {batch_size, channels, height, width}, layout);
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  check_roi_values(rois, batch_size, "roi_align backward");
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
            ? backward<true, scalar_t, acc_t>
            : backward<false, scalar_t, acc_t>;
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
