// What tch 0.24 does not bind of libtorch's CUDA runtime: binding a thread to its device, pinning without the
// device argument that libtorch 2.11 deprecates (a warning on every call), the caching allocator's peak of allocated
// bytes (what torch.cuda.max_memory_allocated reports), and copies to the device on a side stream so that the next
// batch's host-to-device copy runs while the current step's kernels do (the prefetcher pattern of NVIDIA's apex
// examples: copy on a side stream, an event the compute stream waits on, record_stream so the allocator keeps the
// block). Compiled when the CUDA headers are beside torch.
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
#include <vector>

#include "shim_error.h"

namespace {
c10::impl::VirtualGuardImpl& cuda_impl() {
  static c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl;
}

c10::Device cuda(int dev) { return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(dev)); }

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
// Makes `dev` the calling thread's current CUDA device (torch.cuda.set_device; the CUDA current device is per
// thread, so every thread that touches CUDA is bound, as PyTorch's pin-memory thread is: utils/data/_utils/pin_memory.py).
int lmim_cuda_set_device(int dev) {
  return lmim_guarded([&] { cuda_impl().setDevice(cuda(dev)); });
}

// `*out` = `src` in page-locked memory (a new tensor the caller owns); `Tensor::pin_memory()` without a device,
// which libtorch 2.11 no longer warns about.
int lmim_pin_memory(at::Tensor* src, at::Tensor** out) {
  return lmim_guarded([&] { *out = new at::Tensor(src->pin_memory()); });
}

// 1 when `t` is in pinned memory, 0 when not, -1 on an error.
int lmim_is_pinned(at::Tensor* t) {
  int pinned = 0;
  if (lmim_guarded([&] { pinned = t->is_pinned() ? 1 : 0; }) != 0) return -1;
  return pinned;
}

// Peak bytes allocated on `dev` since the last reset; `reset` != 0 resets the peak afterwards.
int lmim_cuda_peak_bytes(int dev, int reset, long long* out) {
  return lmim_guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev);
    *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    if (reset) c10::cuda::CUDACachingAllocator::resetPeakStats(dev);
  });
}

// Copies the (pinned) host tensors `src[0..n)` to device `dev` on the copy stream, non-blocking, into `out[0..n)`
// (new tensors the caller owns, handed over only when every copy was queued: a failure leaks nothing), and returns
// in `event` an event recorded after the copies. The outputs are marked as used on the compute stream, so the
// caching allocator does not hand their blocks out again before the compute stream's work on them is done.
int lmim_cuda_copy_ahead(at::Tensor** src, int n, int dev, at::Tensor** out, void** event) {
  return lmim_guarded([&] {
    auto device = cuda(dev);
    auto compute = cuda_impl().getStream(device);
    auto side = copy_stream(device);
    auto ev = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
    std::vector<at::Tensor> copies;
    copies.reserve(n);
    {
      c10::StreamGuard guard(side);
      for (int i = 0; i < n; ++i) {
        copies.push_back(src[i]->to(device, /*non_blocking=*/true));
        copies.back().record_stream(compute);
      }
      ev->record(side);
    }
    for (int i = 0; i < n; ++i) out[i] = new at::Tensor(std::move(copies[i]));
    *event = ev.release();
  });
}

// Makes the current stream of `dev` wait (on the device, not the host) for the copies behind `event`, then frees
// the event (also when the wait fails).
int lmim_cuda_copy_wait(void* event, int dev) {
  std::unique_ptr<c10::Event> ev(static_cast<c10::Event*>(event));
  return lmim_guarded([&] { ev->block(cuda_impl().getStream(cuda(dev))); });
}

// Frees an event that was never waited on (a batch dropped before its step).
void lmim_cuda_event_free(void* event) { delete static_cast<c10::Event*>(event); }
}
