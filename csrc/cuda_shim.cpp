// What tch 0.24 does not bind of CUDA's caching allocator, for the benchmarks: the peak of allocated bytes (what
// torch.cuda.max_memory_allocated reports). Compiled with the NCCL unit, which needs the same CUDA headers.
#include <c10/cuda/CUDACachingAllocator.h>

#include <string>

#include "shim_error.h"

namespace {
thread_local std::string last_error;
}

extern "C" {
const char* lmim_cuda_last_error() { return last_error.c_str(); }

// Peak bytes allocated on `dev` since the last reset; `reset` != 0 resets the peak afterwards.
int lmim_cuda_peak_bytes(int dev, int reset, long long* out) {
  return lmim_guarded(last_error, [&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev);
    *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    if (reset) c10::cuda::CUDACachingAllocator::resetPeakStats(dev);
  });
}
}
