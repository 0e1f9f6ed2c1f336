#pragma once

// RoIAlign's sampling, split by axis.
//
// A sample point's bilinear weights are a product of a weight along y and one
// along x (w1 = hy * hx, ...), and whether the point lies outside the feature
// map is decided per axis too. So instead of storing four indices and four
// weights for every sample of every bin (pooled_h * pooled_w * grid_h * grid_w
// entries, as Caffe2 and torchvision do), we store the taps of each axis
// (pooled_h * grid_h + pooled_w * grid_w entries) and form the products in the
// inner loop, where they are amortised over a block of channels. The
// arithmetic is torchvision's, operation for operation, so results agree to
// rounding.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace maskray {
namespace ops {
namespace cpu {

// The two neighbours of one sample coordinate and their weights. `lo < 0`
// marks a sample outside the feature map: it contributes nothing.
template <typename acc_t>
struct AxisTap {
  int64_t lo;
  int64_t hi;
  acc_t w_lo;
  acc_t w_hi;
};

// Where one roi lies on the feature map and how its bins are sampled.
template <typename acc_t>
struct RoiGrid {
  int64_t batch_index;
  acc_t start_h, start_w;
  acc_t bin_h, bin_w;
  int64_t grid_h, grid_w; // samples per bin along each axis (may be 0)
  acc_t count; // samples per bin, at least 1
};

// Samples per bin along an axis when sampling_ratio <= 0: ceil(bin size),
// and none for an empty, reversed or NaN bin.
template <typename acc_t>
inline int64_t adaptive_grid(acc_t bin_size) {
  const acc_t n = std::ceil(bin_size);
  return n > 0 ? static_cast<int64_t>(n) : 0;
}

template <typename scalar_t, typename acc_t>
inline RoiGrid<acc_t> roi_grid(
    const scalar_t* roi,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  RoiGrid<acc_t> g;
  g.batch_index = static_cast<int64_t>(static_cast<acc_t>(roi[0]));
  // Continuous coordinates: aligned=True shifts by half a pixel so that a box
  // edge at pixel index i maps to the centre of cell i (Detectron2's fix).
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  g.start_w = static_cast<acc_t>(roi[1]) * spatial_scale - offset;
  g.start_h = static_cast<acc_t>(roi[2]) * spatial_scale - offset;
  const acc_t end_w = static_cast<acc_t>(roi[3]) * spatial_scale - offset;
  const acc_t end_h = static_cast<acc_t>(roi[4]) * spatial_scale - offset;
  acc_t width = end_w - g.start_w;
  acc_t height = end_h - g.start_h;
  if (!aligned) {
    // The legacy behaviour: malformed rois are forced to 1x1.
    width = std::max(width, acc_t(1));
    height = std::max(height, acc_t(1));
  }
  g.bin_h = height / static_cast<acc_t>(pooled_height);
  g.bin_w = width / static_cast<acc_t>(pooled_width);
  // sampling_ratio <= 0 means adaptive: about one sample per feature cell.
  g.grid_h = sampling_ratio > 0 ? sampling_ratio
                                 : adaptive_grid(height / pooled_height);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio
                                 : adaptive_grid(width / pooled_width);
  g.count = static_cast<acc_t>(std::max<int64_t>(g.grid_h * g.grid_w, 1));
  return g;
}

// Writes pooled * grid taps to `taps`: those of sample i of bin p at
// taps[p * grid + i], for an axis of `size` feature cells.
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
      acc_t v = start + p * bin +
          static_cast<acc_t>(i + .5f) * bin / static_cast<acc_t>(grid);
      AxisTap<acc_t>& t = taps[p * grid + i];
      // Written as !(inside) so that a NaN coordinate counts as outside.
      if (!(v >= -1.0 && v <= size)) {
        t = {-1, -1, acc_t(0), acc_t(0)};
        continue;
      }
      if (v <= 0) {
        v = 0;
      }
      int64_t lo = static_cast<int64_t>(v);
      int64_t hi;
      if (lo >= size - 1) {
        hi = lo = size - 1;
        v = static_cast<acc_t>(lo);
      } else {
        hi = lo + 1;
      }
      const acc_t l = v - lo;
      const acc_t h = 1. - l;
      t = {lo, hi, h, l};
    }
  }
}

// The grids and taps of every roi, computed once per call, and the rois
// grouped by batch image. Kernels then walk (image, channel block) items: a
// block of one image's channel planes stays in cache while all the rois on
// that image are pooled from it, which is what makes the contiguous layout
// fast (each roi reading all C planes in turn would stream the whole feature
// map from memory once per roi).
template <typename acc_t>
struct RoiTable {
  std::vector<RoiGrid<acc_t>> grids;
  std::vector<int64_t> y_begin, x_begin; // roi k's taps start at y[y_begin[k]]
  std::vector<AxisTap<acc_t>> y, x;
  std::vector<int64_t> order; // roi indices grouped by image, in input order
  std::vector<int64_t> image_begin; // image b's rois: order[image_begin[b]..]

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
      : grids(num_rois), y_begin(num_rois + 1), x_begin(num_rois + 1) {
    y_begin[0] = x_begin[0] = 0;
    for (int64_t k = 0; k < num_rois; ++k) {
      grids[k] = roi_grid<scalar_t, acc_t>(
          rois + k * 5, static_cast<acc_t>(spatial_scale), pooled_height,
          pooled_width, sampling_ratio, aligned);
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
    // Counting sort by image; batch indices were validated by the caller.
    image_begin.assign(batch_size + 1, 0);
    for (int64_t k = 0; k < num_rois; ++k) {
      ++image_begin[grids[k].batch_index + 1];
    }
    for (int64_t b = 0; b < batch_size; ++b) {
      image_begin[b + 1] += image_begin[b];
    }
    order.resize(num_rois);
    std::vector<int64_t> next(image_begin.begin(), image_begin.end() - 1);
    for (int64_t k = 0; k < num_rois; ++k) {
      order[next[grids[k].batch_index]++] = k;
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
