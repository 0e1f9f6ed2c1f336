#pragma once

// Memory layouts and the gradient buffer, shared by the CPU and CUDA kernels.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace maskray {
namespace ops {

// Both CPU and CUDA kernels compute channels_last inputs in that layout and
// return channels_last outputs; anything else is made contiguous (NCHW). The
// Python fake kernels in model/ops apply the same rule.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() &&
      t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast
                             : at::MemoryFormat::Contiguous;
}

// The buffer a backward adds into: zeros of `sizes` in `layout`, in float32
// for half and bfloat16 gradients so that the many small contributions a cell
// receives are not each rounded to 8 or 11 bits. Cast once at the end with
// `.to(grad.scalar_type())`, which keeps the layout.
inline at::Tensor gradient_buffer(
    const at::Tensor& grad, at::IntArrayRef sizes, at::MemoryFormat layout) {
  const auto options =
      grad.options().dtype(at::toOpMathType(grad.scalar_type()));
  // at::zeros ignores a memory format in its options; empty honours it.
  return at::empty(sizes, options.memory_format(layout)).zero_();
}

} // namespace ops
} // namespace maskray
