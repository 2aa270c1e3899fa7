// ProcessGroupNCCL for c10d_shim.cpp, in its own translation unit: only it needs the CUDA and NCCL headers
// (the CUDA wheels' nvidia-cuda-runtime/-crt/-cccl and nvidia-nccl-cu13, whose nccl.h must be the version torch pins).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <cstdlib>

c10::intrusive_ptr<c10d::Backend> lmim_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                 std::chrono::milliseconds timeout, int device) {
  // A watchdog timeout aborts the communicators and leaves the process to its owner (CleanUpOnly): the error then
  // reaches lmim-bench (the next wait() throws, its failure watcher reads getError()), which names it and exits 1 on
  // every rank. PyTorch's default (3, SkipCleanUp) ends the process from the watchdog thread with std::terminate:
  // SIGABRT and a core dump, without lmim-bench's message. A value the user set is kept.
  setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", 0);
  // A CUDA error the watchdog meets (a device-side assert in a kernel) is rethrown into the next wait() on the main
  // thread, so it reaches lmim-bench's failure path (message to the store, then the abort) rather than ending the
  // process from the watchdog thread. PyTorch's default, said here so a changed default cannot drop it.
  setenv("TORCH_NCCL_RETHROW_CUDA_ERRORS", "1", 0);
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
  // As init_process_group(device_id=...): the group's device is known, not guessed as rank % devices on the first
  // collective (ProcessGroupNCCL::guessDeviceId), so no rank creates a context on another rank's GPU.
  if (device >= 0) {
    at::Device dev(at::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    pg->setBoundDeviceId(dev);
    // As init_process_group(device_id=...) does: the communicator is made now, so a broken interconnect or a
    // missing peer fails here, at start, with NCCL's message, not in the first collective of training.
    pg->eagerConnectSingleDevice(dev);
  }
  return pg;
}
