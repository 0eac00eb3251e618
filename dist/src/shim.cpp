// The c10d pieces geossl's data-parallel training uses, behind a C ABI:
// a TCPStore rendezvous and a ProcessGroupGloo on it, and collectives on
// tch tensors (a tch Tensor wraps an `at::Tensor*`). Every function catches
// C++ exceptions and returns their message (non-zero status), never throws.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

int fail(const std::exception& e, char* err, size_t len) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, e.what(), len - 1);
    err[len - 1] = '\0';
  }
  return 1;
}

}  // namespace

extern "C" {

// Rendezvous at host:port (rank 0 serves the store; port 0 lets it pick one,
// see geossl_c10d_port) and a Gloo group over `world` ranks.
int geossl_c10d_new(const char* host, int port, int rank, int world, long timeout_ms, void** out, char* err,
                    size_t len) {
  try {
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
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(host)));
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("geossl/", store);
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, opts);
    *out = new Group{store, pg};
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, len);
  }
}

// The store's port (rank 0 with port 0: the one it bound).
int geossl_c10d_port(void* g) { return static_cast<Group*>(g)->store->getPort(); }

void geossl_c10d_free(void* g) { delete static_cast<Group*>(g); }

// Sum of `t` over the ranks, in place.
int geossl_c10d_all_reduce_sum(void* g, void* t, char* err, size_t len) {
  try {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(t)};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(g)->pg->allreduce(ts, o)->wait();
    return 0;
  } catch (const std::exception& e) {
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
    return fail(e, err, len);
  }
}

int geossl_c10d_barrier(void* g, char* err, size_t len) {
  try {
    static_cast<Group*>(g)->pg->barrier()->wait();
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, len);
  }
}

}  // extern "C"
