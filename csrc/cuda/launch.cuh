#pragma once

// How the host side of the CUDA ops (roi_align_launch.cuh, roi_pool_launch.cuh)
// runs a kernel: it is written once for a Backend, which is either
// DeviceBackend (indexing.cuh: the GPU, its stream, a launch per kernel) or
// the host backend of tests/cuda_on_host, which walks every block and thread
// of the same grid one after another on the CPU. A Backend has
//   on_device                          true for the GPU
//   Guard(device)                      the device guard of a call
//   check_roi_values(rois, batch, op)  checks.h's value checks
//   blocks(numel)                      the grid size for numel work items
//   walk(blocks, f)                    (host only) f(GridThread) for every
//                                      thread of a grid of `blocks` blocks

#include "grid.cuh"

#include <type_traits>

#if defined(__CUDACC__)
#include "indexing.cuh"

// Runs `body` (a function of roi_*_body.cuh) for every thread of a grid of
// `blocks` blocks of kThreads threads: on the GPU as `kernel`, its __global__
// wrapper, on the current stream; on the host through backend.walk.
#define MASKRAY_RUN_KERNEL(backend, blocks, kernel, body, ...)                  \
  do {                                                                          \
    if constexpr (std::decay_t<decltype(backend)>::on_device) {                 \
      kernel<<<(blocks), ::maskray::ops::cuda::kThreads, 0,                     \
               at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                           \
    } else {                                                                    \
      (backend).walk((blocks), [&](::maskray::ops::cuda::GridThread thread_) {  \
        body(thread_, __VA_ARGS__);                                             \
      });                                                                       \
    }                                                                           \
  } while (0)
#else
#define MASKRAY_RUN_KERNEL(backend, blocks, kernel, body, ...)                 \
  do {                                                                         \
    static_assert(!std::decay_t<decltype(backend)>::on_device,                 \
                  "the CUDA kernels are compiled by nvcc only");               \
    (backend).walk((blocks), [&](::maskray::ops::cuda::GridThread thread_) {   \
      body(thread_, __VA_ARGS__);                                              \
    });                                                                        \
  } while (0)
#endif
