// CUDA RoIAlign, forward and backward, with torchvision.ops.roi_align's
// semantics. NCHW and channels_last inputs are both read in place through
// their strides; each thread owns one output element, taken in the output's
// memory order so that neighbouring threads write neighbouring addresses.

#include "../checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace maskray {
namespace ops {

namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t numel) {
  // A few waves of resident blocks; the grid-stride loops cover the rest.
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t cap = int64_t{prop->multiProcessorCount} *
      (prop->maxThreadsPerMultiProcessor / kThreads) * 4;
  return std::min(at::ceil_div(numel, int64_t{kThreads}), cap);
}

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Index4 {
  int64_t n, c, h, w;
};

// Splits a linear index taken in NCHW or NHWC order into its coordinates.
__device__ __forceinline__ Index4 unravel(
    int64_t i, int64_t channels, int64_t height, int64_t width,
    bool channels_last) {
  Index4 idx;
  if (channels_last) {
    idx.c = i % channels;
    i /= channels;
    idx.w = i % width;
    i /= width;
    idx.h = i % height;
    idx.n = i / height;
  } else {
    idx.w = i % width;
    i /= width;
    idx.h = i % height;
    i /= height;
    idx.c = i % channels;
    idx.n = i / channels;
  }
  return idx;
}

__device__ __forceinline__ int64_t
offset_of(const Index4& i, const Strides4& s) {
  return i.n * s.n + i.c * s.c + i.h * s.h + i.w * s.w;
}

// Where one roi's bins start, how large they are, and how many sample points
// each bin averages.
template <typename acc_t>
struct RoiBins {
  int64_t batch;
  acc_t start_h, start_w;
  acc_t bin_h, bin_w;
  int grid_h, grid_w;
  acc_t count;
};

// Samples per bin along an axis when sampling_ratio <= 0: about one per
// feature cell. A reversed or NaN bin gets none, without the undefined
// NaN-to-int cast.
template <typename acc_t>
__device__ __forceinline__ int adaptive_grid(acc_t bin_size) {
  const acc_t n = ceil(bin_size);
  return n > 0 ? static_cast<int>(n) : 0;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RoiBins<acc_t> roi_bins(
    const scalar_t* roi, acc_t spatial_scale, int64_t pooled_height,
    int64_t pooled_width, int sampling_ratio, bool aligned) {
  RoiBins<acc_t> b;
  b.batch = static_cast<int64_t>(static_cast<acc_t>(roi[0]));
  // With aligned, cell i spans [i, i + 1) in box coordinates while the
  // bilinear grid puts it at i, hence the half-cell shift. Never rounded.
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  b.start_w = static_cast<acc_t>(roi[1]) * spatial_scale - offset;
  b.start_h = static_cast<acc_t>(roi[2]) * spatial_scale - offset;
  const acc_t end_w = static_cast<acc_t>(roi[3]) * spatial_scale - offset;
  const acc_t end_h = static_cast<acc_t>(roi[4]) * spatial_scale - offset;
  acc_t roi_w = end_w - b.start_w;
  acc_t roi_h = end_h - b.start_h;
  if (!aligned) {
    // The legacy mode stretches degenerate boxes to at least one cell.
    roi_w = roi_w < acc_t(1) ? acc_t(1) : roi_w;
    roi_h = roi_h < acc_t(1) ? acc_t(1) : roi_h;
  }
  b.bin_h = roi_h / static_cast<acc_t>(pooled_height);
  b.bin_w = roi_w / static_cast<acc_t>(pooled_width);
  b.grid_h = sampling_ratio > 0
      ? sampling_ratio
      : adaptive_grid(roi_h / static_cast<acc_t>(pooled_height));
  b.grid_w = sampling_ratio > 0
      ? sampling_ratio
      : adaptive_grid(roi_w / static_cast<acc_t>(pooled_width));
  b.count = static_cast<acc_t>(max(b.grid_h * b.grid_w, 1));
  return b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t sample_y(
    const RoiBins<acc_t>& b, int64_t ph, int iy) {
  return b.start_h + static_cast<acc_t>(ph) * b.bin_h +
      static_cast<acc_t>(iy + 0.5f) * b.bin_h / static_cast<acc_t>(b.grid_h);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sample_x(
    const RoiBins<acc_t>& b, int64_t pw, int ix) {
  return b.start_w + static_cast<acc_t>(pw) * b.bin_w +
      static_cast<acc_t>(ix + 0.5f) * b.bin_w / static_cast<acc_t>(b.grid_w);
}

// The four neighbours of a sample point and their bilinear weights.
template <typename acc_t>
struct Bilinear {
  int64_t y_low, y_high, x_low, x_high;
  acc_t w1, w2, w3, w4;
};

// Returns false for a sample that contributes nothing: more than one cell
// outside the map, or NaN (every comparison with NaN is false, so the test is
// written as "not inside" to catch it before the integer casts).
template <typename acc_t>
__device__ __forceinline__ bool bilinear(
    acc_t y, acc_t x, int64_t height, int64_t width, Bilinear<acc_t>& s) {
  if (!(y >= acc_t(-1) && y <= static_cast<acc_t>(height) &&
        x >= acc_t(-1) && x <= static_cast<acc_t>(width))) {
    return false;
  }
  // Samples just outside the map are clamped onto its border.
  if (y <= 0) {
    y = 0;
  }
  if (x <= 0) {
    x = 0;
  }
  s.y_low = static_cast<int64_t>(y);
  s.x_low = static_cast<int64_t>(x);
  if (s.y_low >= height - 1) {
    s.y_high = s.y_low = height - 1;
    y = static_cast<acc_t>(s.y_low);
  } else {
    s.y_high = s.y_low + 1;
  }
  if (s.x_low >= width - 1) {
    s.x_high = s.x_low = width - 1;
    x = static_cast<acc_t>(s.x_low);
  } else {
    s.x_high = s.x_low + 1;
  }
  const acc_t ly = y - static_cast<acc_t>(s.y_low);
  const acc_t lx = x - static_cast<acc_t>(s.x_low);
  const acc_t hy = acc_t(1) - ly;
  const acc_t hx = acc_t(1) - lx;
  s.w1 = hy * hx;
  s.w2 = hy * lx;
  s.w3 = ly * hx;
  s.w4 = ly * lx;
  return true;
}

template <typename scalar_t>
__global__ void roi_align_forward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ input,
    Strides4 in_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ output,
    Strides4 out_stride,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{blockDim.x} * gridDim.x) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const RoiBins<acc_t> b = roi_bins(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width,
        sampling_ratio, aligned);
    const scalar_t* plane =
        input + b.batch * in_stride.n + o.c * in_stride.c;

    acc_t sum = 0;
    for (int iy = 0; iy < b.grid_h; ++iy) {
      const acc_t y = sample_y(b, o.h, iy);
      for (int ix = 0; ix < b.grid_w; ++ix) {
        const acc_t x = sample_x(b, o.w, ix);
        Bilinear<acc_t> s;
        if (!bilinear(y, x, height, width, s)) {
          continue;
        }
        const auto v = [&](int64_t h, int64_t w) {
          return static_cast<acc_t>(plane[h * in_stride.h + w * in_stride.w]);
        };
        sum += s.w1 * v(s.y_low, s.x_low) + s.w2 * v(s.y_low, s.x_high) +
            s.w3 * v(s.y_high, s.x_low) + s.w4 * v(s.y_high, s.x_high);
      }
    }
    output[offset_of(o, out_stride)] = static_cast<scalar_t>(sum / b.count);
  }
}

template <typename scalar_t>
__global__ void roi_align_backward_cuda(
    int64_t numel,
    const scalar_t* __restrict__ grad,
    Strides4 grad_stride,
    const scalar_t* __restrict__ rois,
    scalar_t* __restrict__ grad_input,
    Strides4 in_stride,
    int64_t grad_input_numel,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    at::opmath_type<scalar_t> spatial_scale,
    int sampling_ratio,
    bool aligned,
    bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{blockDim.x} * gridDim.x) {
    const Index4 o =
        unravel(i, channels, pooled_height, pooled_width, channels_last);
    const RoiBins<acc_t> b = roi_bins(
        rois + o.n * 5, spatial_scale, pooled_height, pooled_width,
        sampling_ratio, aligned);
    const acc_t g = static_cast<acc_t>(grad[offset_of(o, grad_stride)]);
    const int64_t plane = b.batch * in_stride.n + o.c * in_stride.c;

    for (int iy = 0; iy < b.grid_h; ++iy) {
      const acc_t y = sample_y(b, o.h, iy);
      for (int ix = 0; ix < b.grid_w; ++ix) {
        const acc_t x = sample_x(b, o.w, ix);
        Bilinear<acc_t> s;
        if (!bilinear(y, x, height, width, s)) {
          continue;
        }
        const auto add = [&](int64_t h, int64_t w, acc_t weight) {
          at::native::fastAtomicAdd(
              grad_input, plane + h * in_stride.h + w * in_stride.w,
              grad_input_numel, static_cast<scalar_t>(g * weight / b.count),
              true);
        };
        add(s.y_low, s.x_low, s.w1);
        add(s.y_low, s.x_high, s.w2);
        add(s.y_high, s.x_low, s.w3);
        add(s.y_high, s.x_high, s.w4);
      }
    }
  }
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
  check_roi_batch_indices(rois, input.size(0), "roi_align");
  at::cuda::CUDAGuard device_guard(input.device());

  const auto layout = layout_of(input);
  const at::Tensor input_ = input.contiguous(layout);
  const at::Tensor rois_ = rois.contiguous();
  const int64_t channels = input.size(1);
  at::Tensor output = at::empty(
      {rois.size(0), channels, pooled_height, pooled_width},
      input.options().memory_format(layout));
  if (output.numel() == 0) {
    return output;
  }
  // A map without cells has nothing to sample (and the border clamp would
  // index cell -1).
  if (input.numel() == 0) {
    return output.zero_();
  }

  const int64_t numel = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(),
      "roi_align_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        roi_align_forward_cuda<scalar_t>
            <<<num_blocks(numel), kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                numel, input_.const_data_ptr<scalar_t>(), strides_of(input_),
                rois_.const_data_ptr<scalar_t>(),
                output.mutable_data_ptr<scalar_t>(), strides_of(output),
                channels, input.size(2), input.size(3), pooled_height,
                pooled_width, static_cast<acc_t>(spatial_scale),
                static_cast<int>(sampling_ratio), aligned,
                layout == at::MemoryFormat::ChannelsLast);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(
      grad.dim() == 4,
      "roi_align backward: grad must be a 4-D tensor (K, C, PH, PW), got ",
      grad.dim(), "-D with shape ", grad.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5,
      "roi_align backward: rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK(
      grad.sizes().equals(
          {rois.size(0), channels, pooled_height, pooled_width}),
      "roi_align backward: grad must have shape [K, channels, pooled_height, "
      "pooled_width] = [",
      rois.size(0), ", ", channels, ", ", pooled_height, ", ", pooled_width,
      "], got ", grad.sizes());
  TORCH_CHECK(
      grad.device() == rois.device(),
      "roi_align backward: grad and rois must be on the same device, got ",
      grad.device(), " and ", rois.device());
  TORCH_CHECK(
      grad.scalar_type() == rois.scalar_type(),
      "roi_align backward: grad and rois must have the same dtype, got ",
      grad.scalar_type(), " and ", rois.scalar_type());
  at::globalContext().alertNotDeterministic(
      "maskray::roi_align_backward (CUDA)");
  at::cuda::CUDAGuard device_guard(grad.device());

  const auto layout = layout_of(grad);
  at::Tensor grad_input = at::zeros(
      {batch_size, channels, height, width},
      grad.options().memory_format(layout));
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input;
  }
  // A bad batch index would scatter outside grad_input.
  check_roi_batch_indices(rois, batch_size, "roi_align backward");

  const at::Tensor rois_ = rois.contiguous();
  const int64_t numel = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, grad.scalar_type(),
      "roi_align_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        roi_align_backward_cuda<scalar_t>
            <<<num_blocks(numel), kThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                numel, grad.const_data_ptr<scalar_t>(), strides_of(grad),
                rois_.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<scalar_t>(),
                strides_of(grad_input), grad_input.numel(), channels, height,
                width, pooled_height, pooled_width,
                static_cast<acc_t>(spatial_scale),
                static_cast<int>(sampling_ratio), aligned,
                layout == at::MemoryFormat::ChannelsLast);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input;
}

} // namespace

TORCH_LIBRARY_IMPL(maskray, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
}

} // namespace ops
} // namespace maskray
