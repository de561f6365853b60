// BackendRouter: which of kvcd's backends compresses a request.
//
// kvcd holds its backends in order of preference (with --backend=cuda or auto on a GPU
// machine: cuda, then the CPU reference). A request goes to the first backend whose
// Supports() accepts its method and head dim; a request passed over by the preferred backend
// carries the reason, which kvcd counts and logs, so that a method the GPU does not run yet
// still gets the exact CPU answer instead of UNIMPLEMENTED.
//
// Thread safety: immutable after construction; Choose may run concurrently.
#ifndef KVCOMPRESS_SERVICE_BACKEND_ROUTER_H_
#define KVCOMPRESS_SERVICE_BACKEND_ROUTER_H_

#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/method_spec.h"

namespace kvcompress {

struct BackendRoute {
  Backend* backend = nullptr;
  // OK when the preferred backend runs the request; else why it did not (UNIMPLEMENTED naming
  // the stage, e.g. "reducer merge_similar is not implemented by the cuda backend ...").
  absl::Status passed_over;
};

class BackendRouter final {
 public:
  // `backends` in order of preference; must not be empty.
  explicit BackendRouter(std::vector<std::unique_ptr<Backend>> backends);
  BackendRouter(const BackendRouter&) = delete;
  BackendRouter& operator=(const BackendRouter&) = delete;

  // The first backend that runs `spec` on `head_dim`. When none does, the status of the last
  // backend (UNIMPLEMENTED naming the stage).
  absl::StatusOr<BackendRoute> Choose(const MethodSpec& spec, int head_dim) const;

  Backend& preferred() const { return *backends_.front(); }
  std::span<const Backend* const> backends() const { return views_; }

 private:
  std::vector<std::unique_ptr<Backend>> backends_;
  std::vector<const Backend*> views_;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_BACKEND_ROUTER_H_
