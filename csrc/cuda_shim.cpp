// What tch 0.24 does not bind of libtorch's CUDA runtime: the caching allocator's peak of allocated bytes (what
// torch.cuda.max_memory_allocated reports), and copies to the device on a side stream so that the next batch's
// host-to-device copy runs while the current step's kernels do (the prefetcher pattern of NVIDIA's apex examples:
// copy on a side stream, an event the compute stream waits on, record_stream so the allocator keeps the block).
// Compiled with the NCCL unit, which needs the same CUDA headers.
// The streams and events go through c10's device-generic interfaces (the CUDA guard implementation that
// libc10_cuda registers), so this unit needs no CUDA runtime symbols at link time.
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "shim_error.h"

namespace {
thread_local std::string last_error;

c10::impl::VirtualGuardImpl& cuda_impl() {
  static c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl;
}

// One copy stream per device for the process (the pool hands out streams round-robin; keeping one keeps the
// copies of consecutive batches in order among themselves).
c10::Stream copy_stream(const c10::Device& dev) {
  static std::mutex mu;
  static std::map<c10::DeviceIndex, c10::Stream> streams;
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(dev.index());
  if (it == streams.end()) it = streams.emplace(dev.index(), cuda_impl().getStreamFromGlobalPool(dev, false)).first;
  return it->second;
}
}  // namespace

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

// Copies the (pinned) host tensors `src[0..n)` to device `dev` on the copy stream, non-blocking, into `out[0..n)`
// (new tensors the caller owns), and returns in `event` an event recorded after the copies. The outputs are marked
// as used on the compute stream, so the caching allocator does not hand their blocks out again before the compute
// stream's work on them is done.
int lmim_cuda_copy_ahead(at::Tensor** src, int n, int dev, at::Tensor** out, void** event) {
  return lmim_guarded(last_error, [&] {
    c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(dev));
    auto compute = cuda_impl().getStream(device);
    auto side = copy_stream(device);
    auto ev = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
    {
      c10::StreamGuard guard(side);
      for (int i = 0; i < n; ++i) {
        auto t = src[i]->to(device, /*non_blocking=*/true);
        t.record_stream(compute);
        out[i] = new at::Tensor(std::move(t));
      }
      ev->record(side);
    }
    *event = ev.release();
  });
}

// Makes the current stream of `dev` wait (on the device, not the host) for the copies behind `event`, then frees
// the event.
int lmim_cuda_copy_wait(void* event, int dev) {
  return lmim_guarded(last_error, [&] {
    auto ev = static_cast<c10::Event*>(event);
    ev->block(cuda_impl().getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(dev))));
    delete ev;
  });
}

// Frees an event that was never waited on (a batch dropped before its step).
void lmim_cuda_event_free(void* event) { delete static_cast<c10::Event*>(event); }
}
