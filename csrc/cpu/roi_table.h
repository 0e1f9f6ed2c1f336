#pragma once

// RoIAlign's sampling for a whole call, computed once: each roi's grid and the
// taps of its sample coordinates per axis (pooled_h * grid_h + pooled_w *
// grid_w entries, instead of the four indices and weights per sample that
// Caffe2 and torchvision precompute), with the rois grouped by batch image.

#include "../roi_geometry.h"
#include "rois_by_image.h"

#include <ATen/ATen.h>

#include <vector>

namespace maskray {
namespace ops {
namespace cpu {

// Writes the taps of sample i of bin p at taps[p * grid + i], for the
// pooled * grid samples along an axis of `size` cells.
template <typename acc_t>
inline void axis_taps(
    acc_t start,
    acc_t bin,
    int64_t pooled,
    int64_t grid,
    int64_t size,
    AxisTap<acc_t>* taps) {
  for (int64_t p = 0; p < pooled; ++p) {
    for (int64_t i = 0; i < grid; ++i) {
      taps[p * grid + i] =
          axis_tap(sample_coordinate(start, bin, p, i, grid), size);
    }
  }
}

// Calls visit(b) with the bilinear neighbours b of every sample of one bin
// that lies on the map; ty and tx are the taps of the bin's row and column.
template <typename acc_t, typename Visit>
inline void for_each_sample(
    const AxisTap<acc_t>* ty,
    int64_t grid_h,
    const AxisTap<acc_t>* tx,
    int64_t grid_w,
    Visit&& visit) {
  for (int64_t iy = 0; iy < grid_h; ++iy) {
    if (ty[iy].lo < 0) {
      continue;
    }
    for (int64_t ix = 0; ix < grid_w; ++ix) {
      if (tx[ix].lo >= 0) {
        visit(bilinear(ty[iy], tx[ix]));
      }
    }
  }
}

// More samples per bin along an axis than any real feature map needs.
constexpr int64_t kMaxAdaptiveGrid = 1 << 16;

// The grids and taps of every roi of a call, and the rois grouped by image.
template <typename acc_t>
struct RoiTable {
  std::vector<RoiGrid<acc_t>> grids;
  std::vector<int64_t> y_begin, x_begin; // roi k's taps start at y[y_begin[k]]
  std::vector<AxisTap<acc_t>> y, x;
  RoisByImage by_image;

  template <typename scalar_t>
  RoiTable(
      const scalar_t* rois,
      int64_t num_rois,
      int64_t batch_size,
      double spatial_scale,
      int64_t pooled_height,
      int64_t pooled_width,
      int64_t sampling_ratio,
      bool aligned,
      int64_t height,
      int64_t width)
      : grids(num_rois),
        y_begin(num_rois + 1),
        x_begin(num_rois + 1),
        by_image(num_rois, batch_size, [&](int64_t k) {
          return static_cast<int64_t>(static_cast<acc_t>(rois[k * 5]));
        }) {
    y_begin[0] = x_begin[0] = 0;
    for (int64_t k = 0; k < num_rois; ++k) {
      grids[k] = roi_grid<scalar_t, acc_t>(
          rois + k * 5, static_cast<acc_t>(spatial_scale), pooled_height,
          pooled_width, sampling_ratio, aligned);
      // Adaptive sampling takes about one sample per cell the box spans, on
      // or off the map: a box millions of cells wide would take millions.
      TORCH_CHECK(
          grids[k].grid_h <= kMaxAdaptiveGrid && grids[k].grid_w <= kMaxAdaptiveGrid,
          "roi_align: rois[", k, "] spans ", grids[k].grid_h * pooled_height,
          " x ", grids[k].grid_w * pooled_width, " feature cells, too many to "
          "sample one per cell (sampling_ratio <= 0); pass a sampling_ratio > 0");
      y_begin[k + 1] = y_begin[k] + pooled_height * grids[k].grid_h;
      x_begin[k + 1] = x_begin[k] + pooled_width * grids[k].grid_w;
    }
    y.resize(y_begin[num_rois]);
    x.resize(x_begin[num_rois]);
    for (int64_t k = 0; k < num_rois; ++k) {
      const RoiGrid<acc_t>& g = grids[k];
      axis_taps(g.start_h, g.bin_h, pooled_height, g.grid_h, height, &y[y_begin[k]]);
      axis_taps(g.start_w, g.bin_w, pooled_width, g.grid_w, width, &x[x_begin[k]]);
    }
  }

  // Taps of bin row ph / column pw of roi k.
  const AxisTap<acc_t>* y_taps(int64_t k, int64_t ph) const {
    return y.data() + y_begin[k] + ph * grids[k].grid_h;
  }
  const AxisTap<acc_t>* x_taps(int64_t k, int64_t pw) const {
    return x.data() + x_begin[k] + pw * grids[k].grid_w;
  }
};

} // namespace cpu
} // namespace ops
} // namespace maskray
