// RoIPool (Fast R-CNN, Girshick 2015): each bin is quantised to whole feature
// cells and max-pooled, the step that RoIAlign removes. Returns the output and
// the argmax (flat h * W + w index per output element, -1 for an empty bin)
// that the backward needs.

#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace maskray {
namespace ops {

std::tuple<at::Tensor, at::Tensor> roi_pool(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskray::roi_pool", "")
                       .typed<decltype(roi_pool)>();
  return op.call(
      input, rois, spatial_scale, std::move(pooled_height),
      std::move(pooled_width));
}

TORCH_LIBRARY_FRAGMENT(maskray, m) {
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width) -> (Tensor, Tensor)");
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, "
      "float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
      "-> Tensor");
}

} // namespace ops
} // namespace maskray
