#pragma once

// Where RoIAlign samples and what RoIPool pools: the arithmetic that defines
// the two operators, written once for the CPU and the CUDA kernels alike so
// that they cannot drift apart. It is torchvision's arithmetic, operation for
// operation (see torchvision.ops.roi_align / roi_pool), so the results agree
// with it to rounding. All math is in acc_t, the op-math type (float for half
// and bfloat16 inputs).

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace maskray {
namespace ops {

// ---------------------------------------------------------------- RoIAlign

// A sample point's bilinear weights are a product of a weight along y and one
// along x (w1 = hy * hx, ...), and whether it lies outside the feature map is
// decided per axis too. So kernels compute the taps of each axis once and form
// the four products where they use them.

// The two neighbours of one sample coordinate along an axis and their weights.
// `lo < 0` marks a sample outside the feature map: it contributes nothing.
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
// about one per feature cell, and none for an empty, reversed or NaN bin.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t adaptive_grid(acc_t bin_size) {
  const acc_t n = ::ceil(bin_size);
  return n > 0 ? static_cast<int64_t>(n) : 0;
}

// `roi` points at (batch_index, x1, y1, x2, y2) in input-image coordinates.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline RoiGrid<acc_t> roi_grid(
    const scalar_t* roi,
    acc_t spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  RoiGrid<acc_t> g;
  g.batch_index = static_cast<int64_t>(static_cast<acc_t>(roi[0]));
  // aligned=True shifts by half a cell so that a box edge at pixel i maps to
  // the centre of cell i (Detectron2's pixel model). Never rounded.
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  g.start_w = static_cast<acc_t>(roi[1]) * spatial_scale - offset;
  g.start_h = static_cast<acc_t>(roi[2]) * spatial_scale - offset;
  const acc_t end_w = static_cast<acc_t>(roi[3]) * spatial_scale - offset;
  const acc_t end_h = static_cast<acc_t>(roi[4]) * spatial_scale - offset;
  acc_t width = end_w - g.start_w;
  acc_t height = end_h - g.start_h;
  if (!aligned) {
    // The legacy behaviour: malformed rois are forced to at least 1x1.
    width = width < acc_t(1) ? acc_t(1) : width;
    height = height < acc_t(1) ? acc_t(1) : height;
  }
  g.bin_h = height / static_cast<acc_t>(pooled_height);
  g.bin_w = width / static_cast<acc_t>(pooled_width);
  g.grid_h = sampling_ratio > 0
      ? sampling_ratio
      : adaptive_grid(height / static_cast<acc_t>(pooled_height));
  g.grid_w = sampling_ratio > 0
      ? sampling_ratio
      : adaptive_grid(width / static_cast<acc_t>(pooled_width));
  const int64_t samples = g.grid_h * g.grid_w;
  g.count = static_cast<acc_t>(samples > 1 ? samples : 1);
  return g;
}

// The coordinate of sample i (of `grid`) of bin p along an axis.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sample_coordinate(
    acc_t start, acc_t bin, int64_t p, int64_t i, int64_t grid) {
  return start + p * bin +
      static_cast<acc_t>(i + .5f) * bin / static_cast<acc_t>(grid);
}

// The taps of coordinate v on an axis of `size` cells: clamped onto the
// border within one cell of the map, nothing further out.
template <typename acc_t>
C10_HOST_DEVICE inline AxisTap<acc_t> axis_tap(acc_t v, int64_t size) {
  // Written as !(inside) so that a NaN coordinate counts as outside.
  if (!(v >= -1.0 && v <= size)) {
    return {-1, -1, acc_t(0), acc_t(0)};
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
  return {lo, hi, h, l};
}

// The four neighbours of a sample, (row[j], col[j]) with bilinear weight
// weight[j], from the sample's taps along each axis: (y_lo, x_lo),
// (y_lo, x_hi), (y_hi, x_lo), (y_hi, x_hi), torchvision's w1 to w4.
template <typename acc_t>
struct Bilinear {
  int64_t row[4];
  int64_t col[4];
  acc_t weight[4];
};

template <typename acc_t>
C10_HOST_DEVICE inline Bilinear<acc_t> bilinear(
    const AxisTap<acc_t>& y, const AxisTap<acc_t>& x) {
  return {
      {y.lo, y.lo, y.hi, y.hi},
      {x.lo, x.hi, x.lo, x.hi},
      {y.w_lo * x.w_lo, y.w_lo * x.w_hi, y.w_hi * x.w_lo, y.w_hi * x.w_hi}};
}

// ----------------------------------------------------------------- RoIPool

// Feature cells [lo, hi) along one axis.
struct CellRange {
  int64_t lo, hi;
};

// The cells that one output bin max-pools over.
struct PoolBin {
  CellRange rows, cols;
  C10_HOST_DEVICE bool empty() const {
    return rows.hi <= rows.lo || cols.hi <= cols.lo;
  }
};

// One roi quantised to whole feature cells, as Fast R-CNN does (round the
// corners, then floor / ceil each bin's edges): the two roundings that
// RoIAlign removes.
template <typename acc_t>
struct QuantisedRoi {
  int64_t batch_index, start_h, start_w;
  acc_t bin_h, bin_w;

  template <typename scalar_t>
  C10_HOST_DEVICE QuantisedRoi(
      const scalar_t* roi,
      acc_t spatial_scale,
      int64_t pooled_height,
      int64_t pooled_width) {
    batch_index = static_cast<int64_t>(static_cast<acc_t>(roi[0]));
    start_w = snap(roi[1], spatial_scale);
    start_h = snap(roi[2], spatial_scale);
    const int64_t end_w = snap(roi[3], spatial_scale);
    const int64_t end_h = snap(roi[4], spatial_scale);
    // Both corners are inclusive; a malformed roi still covers one cell.
    const int64_t roi_w = end_w - start_w + 1 > 1 ? end_w - start_w + 1 : 1;
    const int64_t roi_h = end_h - start_h + 1 > 1 ? end_h - start_h + 1 : 1;
    bin_h = static_cast<acc_t>(roi_h) / static_cast<acc_t>(pooled_height);
    bin_w = static_cast<acc_t>(roi_w) / static_cast<acc_t>(pooled_width);
  }

  // The rows of bin row ph on a map `height` cells high, and the columns of
  // bin column pw on one `width` cells wide. Neighbouring bins may share a
  // boundary cell; none is skipped.
  C10_HOST_DEVICE CellRange rows(int64_t ph, int64_t height) const {
    return cells(ph, bin_h, start_h, height);
  }
  C10_HOST_DEVICE CellRange cols(int64_t pw, int64_t width) const {
    return cells(pw, bin_w, start_w, width);
  }
  C10_HOST_DEVICE PoolBin bin(
      int64_t ph, int64_t pw, int64_t height, int64_t width) const {
    return {rows(ph, height), cols(pw, width)};
  }

 private:
  template <typename scalar_t>
  C10_HOST_DEVICE static int64_t snap(scalar_t coordinate, acc_t spatial_scale) {
    // Half away from zero, as C's round.
    return static_cast<int64_t>(
        ::round(static_cast<acc_t>(coordinate) * spatial_scale));
  }
  C10_HOST_DEVICE static int64_t clip(int64_t v, int64_t size) {
    return v < 0 ? 0 : (v > size ? size : v);
  }
  C10_HOST_DEVICE static CellRange cells(
      int64_t p, acc_t bin, int64_t start, int64_t size) {
    return {
        clip(static_cast<int64_t>(::floor(static_cast<acc_t>(p) * bin)) + start, size),
        clip(static_cast<int64_t>(::ceil(static_cast<acc_t>(p + 1) * bin)) + start, size)};
  }
};

// An empty bin pools to 0 and passes no gradient (argmax -1); any other starts
// from -FLT_MAX, in every dtype, as torchvision does.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t pool_initial_value(const PoolBin& bin) {
  return bin.empty() ? acc_t(0) : acc_t(-FLT_MAX);
}

} // namespace ops
} // namespace maskray
