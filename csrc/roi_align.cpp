// RoIAlign (Mask R-CNN, He et al. 2017): bilinear sampling at regular points of
// each bin, averaged. The schema is declared once here; kernels register
// themselves per dispatch key in cpu/, cuda/ and autocast/, the autograd
// formula and the fake (shape) kernel in model/ops/roi_align.py.

#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace maskray {
namespace ops {

at::Tensor roi_align(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskray::roi_align", "")
                       .typed<decltype(roi_align)>();
  return op.call(
      input, rois, spatial_scale, std::move(pooled_height),
      std::move(pooled_width), sampling_ratio, aligned);
}

TORCH_LIBRARY_FRAGMENT(maskray, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor");
}

} // namespace ops
} // namespace maskray
