// The c10d pieces geossl's data-parallel training uses, behind a C ABI:
// a TCPStore rendezvous and a process group on it (ProcessGroupGloo for CPU
// tensors; ProcessGroupNCCL for CUDA tensors where built with USE_C10D_NCCL),
// collectives on tch tensors (a tch Tensor wraps an `at::Tensor*`), DDP's
// gradient Reducer, and per-rank heartbeats that name a lost rank.
// Every function catches C++ exceptions and returns their message (non-zero
// status), never throws.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

// Liveness: every rank adds 1 to its counter in the store each second (from a thread with its own store
// connection, so a rank blocked in a collective still beats). After a failed collective, a rank whose counter
// stands still is gone; a store that cannot be reached means rank 0 (its host) is.
constexpr auto kBeat = std::chrono::milliseconds(1000);

std::string alive_key(int rank) { return "geossl-alive/" + std::to_string(rank); }

c10::intrusive_ptr<c10d::TCPStore> client(const std::string& host, int port, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(port);
  o.isServer = false;
  o.waitWorkers = false;
  o.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(host, o);
}

struct Group {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  std::string host;
  int port = 0;
  int rank = 0;
  int world = 0;
  // A collective failed (a rank gone, a timeout): tear the group down with abort(), not a shutdown that
  // would wait for the lost rank.
  bool failed = false;
  std::atomic<bool> stop{false};
  std::thread heartbeat;

  void beat() {
    heartbeat = std::thread([this]() {
      try {
        auto c = client(host, port, std::chrono::milliseconds(5000));
        const auto key = alive_key(rank);
        while (!stop.load()) {
          c->add(key, 1);
          for (int i = 0; i < 10 && !stop.load(); ++i) std::this_thread::sleep_for(kBeat / 10);
        }
      } catch (const std::exception&) {
        // The store is gone (rank 0 ended): nothing left to tell.
      }
    });
  }
};

int fail(const std::exception& e, char* err, size_t len) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, e.what(), len - 1);
    err[len - 1] = '\0';
  }
  return 1;
}

// DDP's Reducer over a model's trainable parameters: it hooks their gradient accumulators, so each bucket of
// gradients is all-reduced (averaged) as soon as backward has produced it, while the rest of backward runs.
struct Overlap {
  std::vector<at::Tensor> params;
  std::unique_ptr<c10d::Reducer> reducer;
};

}  // namespace

extern "C" {

// 1 when this shim was built with ProcessGroupNCCL.
int geossl_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous at host:port (rank 0 serves the store; port 0 lets it pick one,
// see geossl_c10d_port) and a group over `world` ranks: Gloo (CPU tensors) when
// `cuda_device` < 0, else NCCL on that CUDA device (which becomes the current one).
int geossl_c10d_new(const char* host, int port, int rank, int world, long timeout_ms, int cuda_device, void** out,
                    char* err, size_t len) {
  try {
#ifdef USE_C10D_NCCL
    if (cuda_device >= 0) {
      // The device exists (geossl_dist::Backend::for_device checks it with the reason); set_device throws if not.
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
      // As in PyTorch: wait() makes the current CUDA stream wait for the collective and returns (the host runs
      // ahead); a collective that outlives the group's timeout is caught by NCCL's watchdog, which ends the
      // process with its message. TORCH_NCCL_BLOCKING_WAIT=1 makes wait() block and throw instead (the lost
      // rank is then named like with Gloo; 10-15 % slower on one H200, docs/benchmarks/ddp_gpu.md).
    }
#else
    if (cuda_device >= 0) {
      throw std::runtime_error("this build has no NCCL (geossl-dist was compiled without CUDA headers)");
    }
#endif
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = false;
    so.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    // Every rank must agree on the world size: rank 0 publishes its own, the others compare before the group
    // forms (a mismatch would otherwise only show as a timeout).
    const std::string key = "geossl/world_size";
    const std::string mine = std::to_string(world);
    if (rank == 0) {
      store->set(key, std::vector<uint8_t>(mine.begin(), mine.end()));
    } else {
      auto v = store->get(key);
      std::string theirs(v.begin(), v.end());
      if (theirs != mine) {
        throw std::runtime_error("WORLD_SIZE differs: rank 0 has " + theirs + ", rank " + std::to_string(rank) +
                                 " has " + mine);
      }
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("geossl/", store);
    c10::intrusive_ptr<c10d::Backend> pg;
#ifdef USE_C10D_NCCL
    if (cuda_device >= 0) {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world, opts);
      pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device)));
    }
#endif
    if (!pg) {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(host)));
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, opts);
    }
    auto* group = new Group{store, pg, std::string(host), static_cast<int>(store->getPort()), rank, world};
    group->beat();
    *out = group;
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, len);
  }
}

// The store's port (rank 0 with port 0: the one it bound).
int geossl_c10d_port(void* g) { return static_cast<Group*>(g)->store->getPort(); }

void geossl_c10d_free(void* g) {
  auto* group = static_cast<Group*>(g);
  group->stop.store(true);
  if (group->heartbeat.joinable()) group->heartbeat.join();
  try {
    if (group->failed) {
      group->pg->abort();
    } else {
      group->pg->shutdown();
    }
  } catch (const std::exception&) {
    // Nothing more to do for a group being dropped.
  }
  delete group;
}

// The ranks whose heartbeat stood still over `wait_ms` (other than the caller), into `out` (at most `cap`);
// their number, or -1 when the store cannot be reached (rank 0, which hosts it, is gone). The first rank to
// find lost ranks records them in the store, and later ones report that finding: a survivor that timed out
// long after another survivor exited still names the rank that was lost first, not the one that left after.
int geossl_c10d_lost_ranks(void* g, long wait_ms, int* out, int cap) {
  auto* group = static_cast<Group*>(g);
  const std::string verdict = "geossl-lost";
  auto parse = [&](const std::vector<uint8_t>& v) {
    int n = 0;
    std::string s(v.begin(), v.end()), item;
    for (size_t i = 0; i <= s.size(); ++i) {
      if (i == s.size() || s[i] == ',') {
        if (!item.empty() && n < cap) out[n++] = std::stoi(item);
        item.clear();
      } else {
        item.push_back(s[i]);
      }
    }
    return n;
  };
  try {
    auto c = client(group->host, group->port, std::chrono::milliseconds(3000));
    if (c->check({verdict})) return parse(c->get(verdict));
    auto read = [&]() {
      std::vector<int64_t> v;
      for (int r = 0; r < group->world; ++r) v.push_back(c->add(alive_key(r), 0));
      return v;
    };
    auto before = read();
    std::this_thread::sleep_for(std::chrono::milliseconds(wait_ms));
    auto after = read();
    std::string found;
    for (int r = 0; r < group->world; ++r) {
      if (r != group->rank && before[r] == after[r]) found += (found.empty() ? "" : ",") + std::to_string(r);
    }
    if (found.empty()) return 0;
    return parse(c->compareSet(verdict, {}, std::vector<uint8_t>(found.begin(), found.end())));
  } catch (const std::exception&) {
    return -1;
  }
}

// Sum of `t` over the ranks, in place.
int geossl_c10d_all_reduce_sum(void* g, void* t, char* err, size_t len) {
  try {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(t)};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(g)->pg->allreduce(ts, o)->wait();
    return 0;
  } catch (const std::exception& e) {
    static_cast<Group*>(g)->failed = true;
    return fail(e, err, len);
  }
}

// `t` of rank `root` on every rank, in place.
int geossl_c10d_broadcast(void* g, void* t, int root, char* err, size_t len) {
  try {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(t)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Group*>(g)->pg->broadcast(ts, o)->wait();
    return 0;
  } catch (const std::exception& e) {
    static_cast<Group*>(g)->failed = true;
    return fail(e, err, len);
  }
}

// Every rank's `in` into `out` (world × in's shape, rank order): out[r] = in of rank r.
int geossl_c10d_all_gather(void* g, void* out, void* in, char* err, size_t len) {
  try {
    auto* group = static_cast<Group*>(g);
    at::Tensor& o = *static_cast<at::Tensor*>(out);
    std::vector<at::Tensor> parts;
    for (int r = 0; r < group->pg->getSize(); ++r) parts.push_back(o[r]);
    std::vector<std::vector<at::Tensor>> outs{parts};
    std::vector<at::Tensor> ins{*static_cast<at::Tensor*>(in)};
    group->pg->allgather(outs, ins)->wait();
    return 0;
  } catch (const std::exception& e) {
    static_cast<Group*>(g)->failed = true;
    return fail(e, err, len);
  }
}

int geossl_c10d_barrier(void* g, char* err, size_t len) {
  try {
    static_cast<Group*>(g)->pg->barrier()->wait();
    return 0;
  } catch (const std::exception& e) {
    static_cast<Group*>(g)->failed = true;
    return fail(e, err, len);
  }
}

// A Reducer for `params` (n `at::Tensor*`, leaf tensors that require grad, on one device) over the group:
// buckets of at most `bucket_bytes` (DDP's 1 MiB first bucket, so the first all-reduce starts early), built in
// reverse parameter order as DDP does (backward produces the last layers' gradients first).
int geossl_c10d_reducer_new(void* g, void** params, size_t n, long bucket_bytes, void** out, char* err, size_t len) {
  try {
    auto* group = static_cast<Group*>(g);
    auto o = std::make_unique<Overlap>();
    for (size_t i = 0; i < n; ++i) o->params.push_back(*static_cast<at::Tensor*>(params[i]));
    if (o->params.empty()) throw std::runtime_error("no parameters to reduce");
    const auto type = o->params[0].device().type();
    const auto backend =
        type == c10::DeviceType::CUDA ? c10d::ProcessGroup::BackendType::NCCL : c10d::ProcessGroup::BackendType::GLOO;
    auto wrapper = c10::make_intrusive<c10d::ProcessGroup>(group->store, group->rank, group->world);
    wrapper->setBackend(type, backend, group->pg);
    wrapper->setDefaultBackend(backend);
    const size_t first = 1024 * 1024;
    const auto cap = static_cast<size_t>(bucket_bytes);
    std::vector<bool> sparse(n, false);
    auto assigned = c10d::compute_bucket_assignment_by_size(o->params, {first, cap}, sparse);
    auto buckets = std::get<0>(assigned);
    std::reverse(buckets.begin(), buckets.end());
    o->reducer = std::make_unique<c10d::Reducer>(
        o->params, buckets, wrapper, sparse, bucket_bytes,
        /*find_unused_parameters=*/false,  // every parameter gets a gradient each step (the trainer checks)
        /*gradient_as_bucket_view=*/false, std::unordered_map<size_t, std::string>{},
        static_cast<int64_t>(first), /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        std::vector<int64_t>{});
    *out = o.release();
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, len);
  }
}

// Backward from `loss` with the Reducer: afterwards every parameter's .grad holds the mean over the ranks
// (undefined where no rank had a gradient). Gradients are cleared first, so each step's are its own.
int geossl_c10d_reducer_backward(void* g, void* r, void* loss, char* err, size_t len) {
  try {
    auto* o = static_cast<Overlap*>(r);
    for (auto& p : o->params) p.mutable_grad().reset();
    const at::Tensor& l = *static_cast<at::Tensor*>(loss);
    o->reducer->prepare_for_backward({l});
    torch::autograd::backward({l});
    return 0;
  } catch (const std::exception& e) {
    static_cast<Group*>(g)->failed = true;
    return fail(e, err, len);
  }
}

void geossl_c10d_reducer_free(void* r) {
  try {
    delete static_cast<Overlap*>(r);
  } catch (const std::exception&) {
    // ~Reducer may throw (noexcept(false)) when its last backward failed; nothing more to do.
  }
}

}  // extern "C"
