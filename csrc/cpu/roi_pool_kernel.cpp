// RoIPool on the CPU: forward and backward, parallel with at::parallel_for,
// with the same work split as RoIAlign (see roi_align_kernel.cpp): (channel
// block, image) items for NCHW, (roi, output row) items with a vectorisable
// channel loop for channels_last, and a backward over (channel block, image)
// items that needs no atomics and is deterministic.

#include "../checks.h"
#include "../layout.h"
#include "../roi_geometry.h"
#include "rois_by_image.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace maskray {
namespace ops {
namespace {

using cpu::block_items;
using cpu::BlockItem;
using cpu::RoisByImage;

constexpr int64_t kBlock = 8;
constexpr int64_t kBlockLast = 32;

// Every roi's bins, quantised once per call: bin (ph, pw) of roi k covers
// rows[k * PH + ph] x cols[k * PW + pw]; and the rois grouped by image.
struct PoolTable {
  std::vector<int64_t> batch_index;
  std::vector<CellRange> rows, cols;
  int64_t pooled_height, pooled_width;
  RoisByImage by_image;

  template <typename scalar_t>
  PoolTable(
      const scalar_t* rois,
      int64_t num_rois,
      int64_t batch_size,
      double spatial_scale,
      int64_t pooled_height,
      int64_t pooled_width,
      int64_t height,
      int64_t width)
      : batch_index(num_rois),
        rows(num_rois * pooled_height),
        cols(num_rois * pooled_width),
        pooled_height(pooled_height),
        pooled_width(pooled_width),
        by_image(num_rois, batch_size, [&](int64_t k) {
          using acc_t = at::opmath_type<scalar_t>;
          return static_cast<int64_t>(static_cast<acc_t>(rois[k * 5]));
        }) {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t k = 0; k < num_rois; ++k) {
      const QuantisedRoi<acc_t> roi(
          rois + k * 5, static_cast<acc_t>(spatial_scale), pooled_height,
          pooled_width);
      batch_index[k] = roi.batch_index;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        rows[k * pooled_height + ph] = roi.rows(ph, height);
      }
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        cols[k * pooled_width + pw] = roi.cols(pw, width);
      }
    }
  }

  PoolBin bin(int64_t k, int64_t ph, int64_t pw) const {
    return {rows[k * pooled_height + ph], cols[k * pooled_width + pw]};
  }
};

// Max-pools one bin of `block` channels whose planes are `plane_stride` apart
// (NCHW): one walk over the bin's cells serves the whole block, whose maxima
// stay in registers.
template <int64_t block, typename scalar_t>
inline void pool_bin_nchw(
    const scalar_t* __restrict in,
    int64_t plane_stride,
    int64_t width,
    const PoolBin& bin,
    scalar_t* __restrict out,
    int* __restrict argmax,
    int64_t out_plane_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t best[block];
  int best_index[block];
  for (int64_t c = 0; c < block; ++c) {
    best[c] = pool_initial_value<acc_t>(bin);
    best_index[c] = -1;
  }
  for (int64_t h = bin.rows.lo; h < bin.rows.hi; ++h) {
    for (int64_t w = bin.cols.lo; w < bin.cols.hi; ++w) {
      const int index = static_cast<int>(h * width + w);
      for (int64_t c = 0; c < block; ++c) {
        const acc_t v = static_cast<acc_t>(in[c * plane_stride + index]);
        const bool better = v > best[c];
        best[c] = better ? v : best[c];
        best_index[c] = better ? index : best_index[c];
      }
    }
  }
  for (int64_t c = 0; c < block; ++c) {
    out[c * out_plane_stride] = static_cast<scalar_t>(best[c]);
    argmax[c * out_plane_stride] = best_index[c];
  }
}

// Items are (block of kBlock channels, image), as in RoIAlign's NCHW forward.
template <typename scalar_t>
void forward_nchw(
    const scalar_t* input,
    const PoolTable& table,
    int64_t batch,
    int64_t channels,
    int64_t height,
    int64_t width,
    scalar_t* output,
    int* argmax) {
  const int64_t plane = height * width;
  const int64_t out_plane = table.pooled_height * table.pooled_width;
  const int64_t items = block_items(batch, kBlock, channels);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const BlockItem it(item, batch, kBlock, channels);
      const int64_t image = it.image, c0 = it.c0;
      for (const int64_t* roi = table.by_image.begin(image);
           roi != table.by_image.end(image);
           ++roi) {
        const int64_t k = *roi;
        for (int64_t ph = 0; ph < table.pooled_height; ++ph) {
          for (int64_t pw = 0; pw < table.pooled_width; ++pw) {
            const PoolBin bin = table.bin(k, ph, pw);
            const int64_t o = (k * channels + c0) * out_plane +
                ph * table.pooled_width + pw;
            const scalar_t* in = input + (image * channels + c0) * plane;
            if (it.block == kBlock) {
              pool_bin_nchw<kBlock>(
                  in, plane, width, bin, output + o, argmax + o, out_plane);
            } else {
              for (int64_t c = 0; c < it.block; ++c) {
                pool_bin_nchw<1>(
                    in + c * plane, plane, width, bin,
                    output + o + c * out_plane, argmax + o + c * out_plane,
                    out_plane);
              }
            }
          }
        }
      }
    }
  });
}

// Items are (roi, output row); the channel loop is innermost and vectorises.
template <typename scalar_t>
void forward_nhwc(
    const scalar_t* input,
    const PoolTable& table,
    int64_t channels,
    int64_t height,
    int64_t width,
    scalar_t* output,
    int* argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = channels;
  const int64_t num_rois = static_cast<int64_t>(table.batch_index.size());
  const int64_t PH = table.pooled_height, PW = table.pooled_width;
  at::parallel_for(0, num_rois * PH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best_buffer(C);
    std::vector<int> index_buffer(C);
    acc_t* __restrict best = best_buffer.data();
    int* __restrict best_index = index_buffer.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / PH;
      const int64_t ph = item % PH;
      const scalar_t* in = input + table.batch_index[k] * height * width * C;
      for (int64_t pw = 0; pw < PW; ++pw) {
        const PoolBin bin = table.bin(k, ph, pw);
        std::fill(best, best + C, pool_initial_value<acc_t>(bin));
        std::fill(best_index, best_index + C, -1);
        for (int64_t h = bin.rows.lo; h < bin.rows.hi; ++h) {
          for (int64_t w = bin.cols.lo; w < bin.cols.hi; ++w) {
            const int index = static_cast<int>(h * width + w);
            const scalar_t* __restrict v = in + index * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t x = static_cast<acc_t>(v[c]);
              const acc_t b = best[c];
              // A bit mask rather than a branch or select of int on a float
              // comparison, which x86-64's baseline (SSE2) cannot vectorise.
              const int take = -static_cast<int>(x > b);
              best[c] = x > b ? x : b;
              best_index[c] = (index & take) | (best_index[c] & ~take);
            }
          }
        }
        const int64_t o = ((k * PH + ph) * PW + pw) * C;
        for (int64_t c = 0; c < C; ++c) {
          output[o + c] = static_cast<scalar_t>(best[c]);
          argmax[o + c] = best_index[c];
        }
      }
    }
  });
}

// Adds each bin's gradient to the cell its maximum came from. grad, argmax
// and grad_input share a layout, contiguous or channels_last. Items are
// (channel block, image), so threads never share a cell.
template <bool channels_last, typename scalar_t>
void backward(
    const scalar_t* grad,
    const int* argmax,
    const RoisByImage& by_image,
    int64_t batch,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t block_size = channels_last ? kBlockLast : kBlock;
  const int64_t cells = height * width;
  const int64_t bins = pooled_height * pooled_width;
  // Strides of an output's channel and bin, and of grad_input's channel and cell.
  const int64_t out_c = channels_last ? 1 : bins;
  const int64_t out_bin = channels_last ? channels : 1;
  const int64_t in_c = channels_last ? 1 : cells;
  const int64_t in_cell = channels_last ? channels : 1;
  const int64_t items = block_items(batch, block_size, channels);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const BlockItem it(item, batch, block_size, channels);
      acc_t* gin = grad_input + it.image * channels * cells;
      for (const int64_t* roi = by_image.begin(it.image);
           roi != by_image.end(it.image);
           ++roi) {
        const int64_t roi_offset = *roi * channels * bins;
        for (int64_t bin = 0; bin < bins; ++bin) {
          for (int64_t c = it.c0; c < it.c0 + it.block; ++c) {
            const int64_t o = roi_offset + c * out_c + bin * out_bin;
            const int cell = argmax[o];
            if (cell >= 0 && cell < cells) { // -1: the bin was empty
              gin[c * in_c + cell * in_cell] += static_cast<acc_t>(grad[o]);
            }
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  check_roi_op_inputs(input, rois, pooled_height, pooled_width, "roi_pool");
  check_roi_values(rois, input.size(0), "roi_pool");
  check_argmax_range(input.size(2), input.size(3), "roi_pool");
  const at::MemoryFormat layout = layout_of(input);
  const int64_t num_rois = rois.size(0);
  const int64_t channels = input.size(1);
  const int64_t height = input.size(2);
  const int64_t width = input.size(3);
  // Every element is written below (an empty bin gets 0 and -1).
  at::Tensor output = at::empty(
      {num_rois, channels, pooled_height, pooled_width},
      input.options().memory_format(layout));
  at::Tensor argmax = at::empty(
      {num_rois, channels, pooled_height, pooled_width},
      input.options().dtype(at::kInt).memory_format(layout));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  const at::Tensor in = input.contiguous(layout);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward", [&] {
        const PoolTable table(
            r.const_data_ptr<scalar_t>(), num_rois, input.size(0),
            spatial_scale, pooled_height, pooled_width, height, width);
        if (layout == at::MemoryFormat::ChannelsLast) {
          forward_nhwc<scalar_t>(
              in.const_data_ptr<scalar_t>(), table, channels, height, width,
              output.mutable_data_ptr<scalar_t>(),
              argmax.mutable_data_ptr<int>());
        } else {
          forward_nchw<scalar_t>(
              in.const_data_ptr<scalar_t>(), table, input.size(0), channels,
              height, width, output.mutable_data_ptr<scalar_t>(),
              argmax.mutable_data_ptr<int>());
        }
      });
  return {output, argmax};
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
  const char* op = "roi_pool backward";
  check_roi_backward_inputs(grad, rois, channels, pooled_height, pooled_width, op);
  check_roi_pool_argmax(argmax, grad, op);
  check_argmax_range(height, width, op);
  const at::MemoryFormat layout = layout_of(grad);
  at::Tensor grad_input =
      gradient_buffer(grad, {batch_size, channels, height, width}, layout);
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  check_roi_values(rois, batch_size, op);
  const at::Tensor g = grad.contiguous(layout);
  const at::Tensor a = argmax.contiguous(layout);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* roi_data = r.const_data_ptr<scalar_t>();
        const RoisByImage by_image(r.size(0), batch_size, [&](int64_t k) {
          return static_cast<int64_t>(static_cast<acc_t>(roi_data[k * 5]));
        });
        auto run = layout == at::MemoryFormat::ChannelsLast
            ? backward<true, scalar_t>
            : backward<false, scalar_t>;
        run(g.const_data_ptr<scalar_t>(), a.const_data_ptr<int>(), by_image,
            batch_size, channels, height, width, pooled_height, pooled_width,
            grad_input.mutable_data_ptr<acc_t>());
      });
  return grad_input.to(grad.scalar_type());
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CPU, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_kernel));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_kernel));
}

} // namespace ops
} // namespace maskray
