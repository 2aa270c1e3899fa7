// ProcessGroupNCCL for c10d_shim.cpp, in its own translation unit: only it needs the CUDA and NCCL headers
// (the CUDA wheels' nvidia-cuda-runtime/-crt/-cccl and nvidia-nccl-cu13, whose nccl.h must be the version torch pins).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

c10::intrusive_ptr<c10d::Backend> lmim_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                 std::chrono::milliseconds timeout, int device) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
  // As init_process_group(device_id=...): the group's device is known, not guessed as rank % devices on the first
  // collective (ProcessGroupNCCL::guessDeviceId), so no rank creates a context on another rank's GPU.
  if (device >= 0) pg->setBoundDeviceId(at::Device(at::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
  return pg;
}
