#pragma once

// Work split by (channel block, image), and the rois grouped by image that
// it needs. The contiguous-layout kernels and every backward walk such items:
// a block of one image's channel planes stays in cache while every roi on that
// image is pooled from it (walking rois one by one, each reading all C planes,
// streams the whole feature map from memory once per roi), and an item writes
// only its own channels of one image, so backward threads never share a cell.

#include <algorithm>
#include <cstdint>
#include <vector>

namespace maskray {
namespace ops {
namespace cpu {

class RoisByImage {
 public:
  // image_of(k) is roi k's batch index, already validated to be in
  // [0, batch_size).
  template <typename ImageOf>
  RoisByImage(int64_t num_rois, int64_t batch_size, ImageOf image_of)
      : order_(num_rois), begin_(batch_size + 1, 0) {
    // A counting sort: stable, O(K + B).
    for (int64_t k = 0; k < num_rois; ++k) {
      ++begin_[image_of(k) + 1];
    }
    for (int64_t b = 0; b < batch_size; ++b) {
      begin_[b + 1] += begin_[b];
    }
    std::vector<int64_t> next(begin_.begin(), begin_.end() - 1);
    for (int64_t k = 0; k < num_rois; ++k) {
      order_[next[image_of(k)]++] = k;
    }
  }

  // The rois of image b: for (const int64_t* k = begin(b); k != end(b); ++k).
  const int64_t* begin(int64_t b) const {
    return order_.data() + begin_[b];
  }
  const int64_t* end(int64_t b) const {
    return order_.data() + begin_[b + 1];
  }

 private:
  std::vector<int64_t> order_;
  std::vector<int64_t> begin_;
};

// Work item `item` of block_items(...): blocks outermost, so that the
// contiguous chunks at::parallel_for hands each thread span all images,
// however unevenly the rois fall on them.
struct BlockItem {
  int64_t image, c0, block;
  BlockItem(int64_t item, int64_t batch, int64_t block_size, int64_t channels)
      : image(item % batch),
        c0((item / batch) * block_size),
        block(std::min(block_size, channels - c0)) {}
};

inline int64_t block_items(int64_t batch, int64_t block_size, int64_t channels) {
  return batch * ((channels + block_size - 1) / block_size);
}

} // namespace cpu
} // namespace ops
} // namespace maskray
