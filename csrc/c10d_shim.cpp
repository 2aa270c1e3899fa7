// A C interface to torch.distributed's C++ engine (c10d) from the libtorch that tch links: TCPStore rendezvous,
// ProcessGroupGloo (CPU) when built with gloo's headers (LMIM_WITH_GLOO) and, when built with CUDA headers,
// ProcessGroupNCCL (nccl_shim.cpp). Tensors cross as
// tch's handles (`torch::Tensor*`, torch-sys libtch/torch_api.h). Every function catches C++ exceptions and keeps
// the message for lmim_c10d_last_error(), so a failed collective becomes a Rust error, never an abort.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#ifdef LMIM_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "shim_error.h"

#ifdef LMIM_WITH_NCCL
c10::intrusive_ptr<c10d::Backend> lmim_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                 std::chrono::milliseconds timeout);
#endif

namespace {
thread_local std::string last_error;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  bool nccl = false;
};

template <class F>
int guarded(F&& f) {
  return lmim_guarded(last_error, std::forward<F>(f));
}

std::vector<at::Tensor> tensors(at::Tensor** ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  for (auto& w : works) w->wait();
}
}  // namespace

extern "C" {

const char* lmim_c10d_last_error() { return last_error.c_str(); }

int lmim_c10d_has_gloo() {
#ifdef LMIM_WITH_GLOO
  return 1;
#else
  return 0;
#endif
}

int lmim_c10d_has_nccl() {
#ifdef LMIM_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous through a TCPStore at host:port (rank 0 serves it unless `client_only`, as under torchrun whose agent
// already serves it), keys under `prefix`, then a process group of `backend` ("gloo" or "nccl").
void* lmim_c10d_init(const char* backend, const char* host, int port, int rank, int size, int client_only,
                     long long timeout_ms, const char* prefix) {
  Group* g = nullptr;
  int rc = guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = !client_only && rank == 0;
    o.numWorkers = size;
    o.waitWorkers = !client_only;
    o.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto group = std::make_unique<Group>();
    group->store = store;
    std::string name(backend);
    if (name == "gloo") {
#ifdef LMIM_WITH_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // As torch.distributed: GLOO_SOCKET_IFNAME names the interface(s), else the host name's address.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname && *ifname) {
        std::string list(ifname);
        size_t start = 0;
        while (start <= list.size()) {
          size_t end = list.find(',', start);
          if (end == std::string::npos) end = list.size();
          if (end > start) opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(list.substr(start, end - start)));
          start = end + 1;
        }
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
#else
      throw std::runtime_error("this build of lmim-bench has no Gloo (it was compiled without gloo's headers)");
#endif
    } else if (name == "nccl") {
#ifdef LMIM_WITH_NCCL
      group->backend = lmim_make_nccl(store, rank, size, timeout);
      group->nccl = true;
#else
      throw std::runtime_error("this build of lmim-bench has no NCCL (it was compiled without the CUDA headers)");
#endif
    } else {
      throw std::runtime_error("unknown backend '" + name + "' (gloo or nccl)");
    }
    g = group.release();
  });
  return rc == 0 ? g : nullptr;
}

// In-place sum over ranks of each tensor; all are started before the first is waited for.
int lmim_c10d_allreduce_sum(void* h, at::Tensor** ts, int n) {
  return guarded([&] {
    auto* g = static_cast<Group*>(h);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      works.push_back(g->backend->allreduce(one));
    }
    wait_all(works);
  });
}

int lmim_c10d_broadcast(void* h, at::Tensor** ts, int n, int root) {
  return guarded([&] {
    auto* g = static_cast<Group*>(h);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      works.push_back(g->backend->broadcast(one, opts));
    }
    wait_all(works);
  });
}

// `outs` holds one tensor per rank, shaped as `input`.
int lmim_c10d_allgather(void* h, at::Tensor* input, at::Tensor** outs, int size) {
  return guarded([&] {
    auto* g = static_cast<Group*>(h);
    std::vector<std::vector<at::Tensor>> out{tensors(outs, size)};
    std::vector<at::Tensor> in{*input};
    g->backend->allgather(out, in)->wait();
  });
}

int lmim_c10d_barrier(void* h) {
  return guarded([&] { static_cast<Group*>(h)->backend->barrier()->wait(); });
}

void lmim_c10d_free(void* h) {
  auto* g = static_cast<Group*>(h);
  guarded([&] {
    if (g->nccl) g->backend->shutdown();
  });
  delete g;
}
}
