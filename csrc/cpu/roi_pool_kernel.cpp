// RoIPool on the CPU: forward and backward, parallel with at::parallel_for,
// with the same work split as RoIAlign (see roi_align_kernel.cpp): (image,
// channel block) items for NCHW, (roi, output row) items with a vectorisable
// channel loop for channels_last, and a backward parallel over channels only
// so that it needs no atomics and is deterministic.

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

// Items are (image, block of kBlock channels), as in RoIAlign's NCHW forward.
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
  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  const int64_t plane = height * width;
  const int64_t out_plane = table.pooled_height * table.pooled_width;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / blocks;
      const int64_t c0 = (item % blocks) * kBlock;
      const int64_t c1 = std::min(channels, c0 + kBlock);
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
            if (c1 - c0 == kBlock) {
              pool_bin_nchw<kBlock>(
                  in, plane, width, bin, output + o, argmax + o, out_plane);
            } else {
              for (int64_t c = 0; c < c1 - c0; ++c) {
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

// grad and argmax share a layout: [K, C, PH, PW] contiguous, or channels_last
// when `channels_last`; grad_input has that layout too.
template <typename scalar_t>
void backward(
    const scalar_t* grad,
    const int* argmax,
    const scalar_t* rois,
    int64_t num_rois,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    bool channels_last,
    at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t block_size = channels_last ? kBlockLast : kBlock;
  const int64_t blocks = (channels + block_size - 1) / block_size;
  const int64_t plane = height * width;
  const int64_t bins = pooled_height * pooled_width;
  // Strides of channel and cell within an image of grad_input.
  const int64_t in_c = channels_last ? 1 : plane;
  const int64_t in_cell = channels_last ? channels : 1;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * block_size;
      const int64_t c1 = std::min(channels, c0 + block_size);
      for (int64_t k = 0; k < num_rois; ++k) {
        const auto image =
            static_cast<int64_t>(static_cast<acc_t>(rois[k * 5]));
        acc_t* gin = grad_input + image * channels * plane;
        const int64_t roi_offset = k * channels * bins;
        const auto add = [&](int64_t o, int64_t c) {
          const int cell = argmax[o];
          if (cell >= 0 && cell < plane) { // -1: the bin was empty
            gin[c * in_c + cell * in_cell] += static_cast<acc_t>(grad[o]);
          }
        };
        // grad and argmax are read in memory order.
        if (channels_last) {
          for (int64_t bin = 0; bin < bins; ++bin) {
            for (int64_t c = c0; c < c1; ++c) {
              add(roi_offset + bin * channels + c, c);
            }
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            for (int64_t bin = 0; bin < bins; ++bin) {
              add(roi_offset + c * bins + bin, c);
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
  check_roi_batch_indices(rois, input.size(0), "roi_pool");
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
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(1) == channels &&
          grad.size(2) == pooled_height && grad.size(3) == pooled_width,
      "roi_pool backward: grad must have shape [K, ", channels, ", ",
      pooled_height, ", ", pooled_width, "], got ", grad.sizes());
  TORCH_CHECK(
      argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt,
      "roi_pool backward: argmax must be an int32 tensor of grad's shape ",
      grad.sizes(), ", got ", argmax.scalar_type(), " ", argmax.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5 && rois.size(0) == grad.size(0),
      "roi_pool backward: rois must have shape [", grad.size(0), ", 5], got ",
      rois.sizes());
  check_argmax_range(height, width, "roi_pool backward");
  const at::MemoryFormat layout = layout_of(grad);
  at::Tensor grad_input =
      gradient_buffer(grad, {batch_size, channels, height, width}, layout);
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  check_roi_batch_indices(rois, batch_size, "roi_pool backward");
  const at::Tensor g = grad.contiguous(layout);
  const at::Tensor a = argmax.contiguous(layout);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward", [&] {
        backward<scalar_t>(
            g.const_data_ptr<scalar_t>(), a.const_data_ptr<int>(),
            r.const_data_ptr<scalar_t>(), r.size(0), channels, height, width,
            pooled_height, pooled_width,
            layout == at::MemoryFormat::ChannelsLast,
            grad_input.mutable_data_ptr<at::opmath_type<scalar_t>>());
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
