// A C interface to torch.distributed's C++ engine (c10d) from the libtorch that tch links: TCPStore rendezvous,
// ProcessGroupGloo (CPU) when built with gloo's headers (LMIM_WITH_GLOO) and, when built with CUDA headers,
// ProcessGroupNCCL (nccl_shim.cpp). Tensors cross as
// tch's handles (`torch::Tensor*`, torch-sys libtch/torch_api.h). Every function catches C++ exceptions and keeps
// the message for lmim_last_error() (shim_error.h), so a failed collective becomes a Rust error, never an abort.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#ifdef LMIM_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "shim_error.h"

#ifdef LMIM_WITH_NCCL
c10::intrusive_ptr<c10d::Backend> lmim_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                 std::chrono::milliseconds timeout, int device);
#endif

namespace {
// The store key a failing rank writes its message under, so that its peers can stop at once instead of waiting
// for a collective that will never complete (under NCCL a host is not even blocked in one: wait() only orders
// streams, ProcessGroupNCCL.hpp).
const char* kFailedKey = "lmim-bench/failed";
// Every rank adds 1 under this key at a normal end; the rank that serves the store waits for all of them before it
// exits, so no peer finds the store gone (which it counts as a failure) while it is still finishing.
const char* kDoneKey = "lmim-bench/done";

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  // The failure watcher's own connection: a TCPStore client serialises its calls, so on the main connection the
  // watcher would wait behind a long get of the main thread.
  c10::intrusive_ptr<c10d::Store> watch_store;
  c10::intrusive_ptr<c10d::Backend> backend;
  // `backend` once it is made (lmim_c10d_join): the watcher and a failing thread run while the main thread is still
  // inside the back-end's construction (Gloo's full mesh, NCCL's eager communicator), and must not read it before.
  std::atomic<c10d::Backend*> ready{nullptr};
  int rank = 0;
  int size = 1;
  std::atomic<bool> nccl{false};
};

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
// already serves it), keys under `prefix`, then a process group of `backend` ("gloo" or "nccl"). `device` is the
// CUDA device an NCCL group is bound to (its communicator is created there, never guessed).
// The rendezvous: connects to (rank 0: serves) the TCPStore and returns a group without a back-end yet, so that
// the heartbeat and the failure watcher run before the back-end is made (lmim_c10d_join), where a lost peer would
// otherwise leave the others waiting out the timeout.
void* lmim_c10d_connect(const char* host, int port, int rank, int size, int client_only, long long timeout_ms,
                        const char* prefix) {
  Group* g = nullptr;
  int rc = lmim_guarded([&] {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = !client_only && rank == 0;
    o.numWorkers = size;
    o.waitWorkers = !client_only;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto group = std::make_unique<Group>();
    group->store = store;
    group->watch_store = store->clone();
    group->rank = rank;
    group->size = size;
    g = group.release();
  });
  return rc == 0 ? g : nullptr;
}

// Makes the group's back-end over its store: Gloo or NCCL (on `device`, communicator made now).
int lmim_c10d_join(void* h, const char* backend, long long timeout_ms, int device) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    std::string name(backend);
    c10::intrusive_ptr<c10d::Backend> made;
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
      made = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, g->rank, g->size, opts);
#else
      throw std::runtime_error("this build of lmim-bench has no Gloo (it was compiled without gloo's headers)");
#endif
    } else if (name == "nccl") {
#ifdef LMIM_WITH_NCCL
      made = lmim_make_nccl(g->store, g->rank, g->size, timeout, device);
      g->nccl = true;
#else
      throw std::runtime_error("this build of lmim-bench has no NCCL (it was compiled without the CUDA headers)");
#endif
    } else {
      throw std::runtime_error("unknown backend '" + name + "' (gloo or nccl)");
    }
    g->backend = made;
    g->ready.store(made.get());
  });
}

// In-place sum over ranks of each tensor; all are started before the first is waited for.
int lmim_c10d_allreduce_sum(void* h, at::Tensor** ts, int n) {
  return lmim_guarded([&] {
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
  return lmim_guarded([&] {
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
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    std::vector<std::vector<at::Tensor>> out{tensors(outs, size)};
    std::vector<at::Tensor> in{*input};
    g->backend->allgather(out, in)->wait();
  });
}

int lmim_c10d_barrier(void* h) {
  return lmim_guarded([&] { static_cast<Group*>(h)->backend->barrier()->wait(); });
}

// This rank failed with `msg`: tells the peers through the store (they poll it, lmim_c10d_peer_failure) and aborts
// the group's communicators (ProcessGroupNCCL::abort; a no-op for Gloo, whose peers see the closed connections).
int lmim_c10d_fail(void* h, const char* msg) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    std::string text = "rank " + std::to_string(g->rank) + ": " + msg;
    try {
      // Over the watcher's connection: this may run on the watcher or a panicking thread while the main thread
      // holds the main connection.
      if (!g->watch_store->check({kFailedKey})) g->watch_store->set(kFailedKey, std::vector<uint8_t>(text.begin(), text.end()));
    } catch (...) {
      // The store's host may be gone already; aborting matters more.
    }
    if (auto* b = g->ready.load()) b->abort();
  });
}

// 1 and the first failed rank's message in `buf` (cut to `len` - 1 bytes) when a rank has failed, 0 when none
// has; non-zero from lmim_guarded when the store cannot be reached.
int lmim_c10d_peer_failure(void* h, char* buf, int len, int* found) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    *found = 0;
    if (!g->watch_store->check({kFailedKey})) return;
    auto v = g->watch_store->get(kFailedKey);
    size_t n = std::min(v.size(), static_cast<size_t>(std::max(len - 1, 0)));
    if (len > 0) {
      std::memcpy(buf, v.data(), n);
      buf[n] = '\0';
    }
    *found = 1;
  });
}

// The back-end's own error state (ProcessGroupNCCL's watchdog: 1 a collective timed out, 2 a communicator error,
// 3 a peer's error); 0 when none or for Gloo, whose errors surface in the collective that meets them.
int lmim_c10d_backend_error(void* h) {
  auto* g = static_cast<Group*>(h);
  auto* b = g->ready.load();
  if (!g->nccl || b == nullptr) return 0;
  int code = 0;
  lmim_guarded([&] { code = static_cast<int>(b->getError()); });
  return code;
}

// A normal end of this rank: counts it done; the rank that serves the store (`host`) then waits up to `timeout_ms`
// for every rank to be done. 1 in `all_done` when they all were.
int lmim_c10d_finish(void* h, int host, long long timeout_ms, int* all_done) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    *all_done = 0;
    auto done = g->store->add(kDoneKey, 1);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    // A rank that failed instead of finishing is not waited for.
    while (host && done < g->size && std::chrono::steady_clock::now() < deadline && !g->store->check({kFailedKey})) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      done = g->store->add(kDoneKey, 0);
    }
    *all_done = done >= g->size ? 1 : 0;
  });
}

// Rank 0's side of a rank-local write the others wait for: sets `key`.
int lmim_c10d_store_set(void* h, const char* key) {
  return lmim_guarded([&] {
    std::string one("1");
    static_cast<Group*>(h)->store->set(key, std::vector<uint8_t>(one.begin(), one.end()));
  });
}

// The others' side: waits up to `timeout_ms` for `key` on the main connection (the failure watcher has its own).
int lmim_c10d_store_wait(void* h, const char* key, long long timeout_ms) {
  return lmim_guarded([&] { static_cast<Group*>(h)->store->wait({std::string(key)}, std::chrono::milliseconds(timeout_ms)); });
}

// A value under `key`, over the main connection or (`watch`) the watcher's own.
int lmim_c10d_store_put(void* h, const char* key, const char* data, int len, int watch) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    auto& store = watch ? g->watch_store : g->store;
    store->set(key, std::vector<uint8_t>(data, data + std::max(len, 0)));
  });
}

// Waits up to `timeout_ms` for `key`, then copies its value into `buf` (cut to `len` bytes); its full length in
// `out_len`.
int lmim_c10d_store_get(void* h, const char* key, long long timeout_ms, char* buf, int len, int* out_len) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    g->store->wait({std::string(key)}, std::chrono::milliseconds(timeout_ms));
    auto v = g->store->get(key);
    *out_len = static_cast<int>(v.size());
    std::memcpy(buf, v.data(), std::min(v.size(), static_cast<size_t>(std::max(len, 0))));
  });
}

// Adds `delta` to the counter under `key` (0 reads it), over the main connection or (`watch`) the watcher's.
int lmim_c10d_store_add(void* h, const char* key, long long delta, int watch, long long* value) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    auto& store = watch ? g->watch_store : g->store;
    *value = store->add(key, delta);
  });
}

// A normal end: shuts NCCL's communicators down (needed before exit, or its watchdog reports an unclean end).
int lmim_c10d_shutdown(void* h) {
  return lmim_guarded([&] {
    auto* g = static_cast<Group*>(h);
    if (auto* b = g->ready.load(); b != nullptr && g->nccl) b->shutdown();
  });
}

void lmim_c10d_free(void* h) { delete static_cast<Group*>(h); }
}
