// What tch 0.24 does not bind of ATen, and the one error slot of the whole shim (shim_error.h).
//
// libtorch's fused AdamW kernel (aten::_fused_adamw_, CPU and CUDA), which tch 0.24 does not bind: one call per
// group of parameters that share lr and weight decay, instead of ~10 FFI calls per parameter. `steps` are the
// per-parameter step counts as float tensors, already incremented for this step (as torch.optim.AdamW does
// before it calls the kernel), so the kernel's bias corrections use the new step. `found_inf` skips the update on the
// device, as torch.amp.GradScaler uses it, so a non-finite loss needs no host read to be kept out of the weights.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/GradMode.h>

#include <optional>
#include <string>
#include <vector>

#include "shim_error.h"

std::string& lmim_error_slot() {
  thread_local std::string slot;
  return slot;
}

namespace {
std::vector<at::Tensor> list(at::Tensor** ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

extern "C" {
// The message of the calling thread's last failed shim call (any translation unit).
const char* lmim_last_error() { return lmim_error_slot().c_str(); }

int lmim_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                     at::Tensor** steps, at::Tensor* found_inf, int n, double lr, double beta1, double beta2, double weight_decay, double eps) {
  return lmim_guarded([&] {
    // The parameters are autograd leaves: an in-place update must not be recorded.
    c10::NoGradGuard no_grad;
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n), s = list(steps, n);
    std::vector<at::Tensor> none;
    // found_inf (may be null): a one-element float tensor; the kernel leaves everything untouched when it is 1.
    std::optional<at::Tensor> inf;
    if (found_inf) inf = *found_inf;
    at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps, false, false, std::nullopt, inf);
  });
}

// Drops the gradients of `params` (PyTorch's zero_grad(set_to_none=True), the default since 2.0): the next backward
// hands each parameter its fresh gradient instead of adding it into a zeroed one, which saves a write of every
// gradient for the zeroing and a read-modify-write for the accumulation.
int lmim_grads_to_none(at::Tensor** params, int n) {
  return lmim_guarded([&] {
    for (int i = 0; i < n; ++i) params[i]->mutable_grad().reset();
  });
}
}

extern "C" {
// torch.use_deterministic_algorithms(True) with cuDNN's deterministic mode and its autotuner off
// (torch.backends.cudnn.deterministic / .benchmark): the same kernels, in the same order, on every repeat.
int lmim_set_deterministic(int on) {
  return lmim_guarded([&] {
    auto& ctx = at::globalContext();
    ctx.setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    ctx.setDeterministicCuDNN(on != 0);
    if (on) ctx.setBenchmarkCuDNN(false);
  });
}

// torch.randperm(n, generator=g) with a fresh CPU generator seeded `seed` (g = torch.Generator(); g.manual_seed(seed)),
// as torch.utils.data.DistributedSampler draws its order: libtorch's own kernel and generator, so the permutation is
// PyTorch's bit for bit, without touching the global generator.
int lmim_randperm_seeded(long long n, unsigned long long seed, at::Tensor** out) {
  return lmim_guarded([&] {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    *out = new at::Tensor(at::randperm(n, gen, at::TensorOptions().dtype(at::kLong)));
  });
}
}

extern "C" {
// torch.backends.cudnn.allow_tf32 (True by default in PyTorch, unlike matmuls): convolutions such as the patch
// embedding run in TF32 on Ampere and later unless it is off. Returns the previous setting.
int lmim_set_cudnn_tf32(int on) {
  auto& ctx = at::globalContext();
  int prev = ctx.allowTF32CuDNN() ? 1 : 0;
  lmim_guarded([&] { ctx.setAllowTF32CuDNN(on != 0); });
  return prev;
}
}
