// Autocast policy of the RoI ops: like torchvision, they run in float32 under
// autocast (bilinear weights and averages lose too much in half precision),
// and the result is cast back to the input's dtype so that the surrounding
// autocast region sees the dtype it passed in.

#include "../ops.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace maskray {
namespace ops {
namespace {

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor roi_align_autocast(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return roi_align(
             at::autocast::cached_cast(at::kFloat, input, device_type),
             at::autocast::cached_cast(at::kFloat, rois, device_type),
             spatial_scale, std::move(pooled_height), std::move(pooled_width),
             sampling_ratio, aligned)
      .to(input.scalar_type());
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor> roi_pool_autocast(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  auto result = roi_pool(
      at::autocast::cached_cast(at::kFloat, input, device_type),
      at::autocast::cached_cast(at::kFloat, rois, device_type), spatial_scale,
      std::move(pooled_height), std::move(pooled_width));
  return {std::get<0>(result).to(input.scalar_type()), std::get<1>(result)};
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, AutocastCPU, m) {
  m.impl(
      "roi_align",
      TORCH_FN((roi_align_autocast<
                c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
  m.impl(
      "roi_pool",
      TORCH_FN((roi_pool_autocast<
                c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(maskray, AutocastCUDA, m) {
  m.impl(
      "roi_align",
      TORCH_FN((roi_align_autocast<
                c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
  m.impl(
      "roi_pool",
      TORCH_FN((roi_pool_autocast<
                c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

} // namespace ops
} // namespace maskray
