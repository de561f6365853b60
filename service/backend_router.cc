#include "service/backend_router.h"

#include <utility>

namespace kvcompress {

BackendRouter::BackendRouter(std::vector<std::unique_ptr<Backend>> backends)
    : backends_(std::move(backends)) {
  for (const std::unique_ptr<Backend>& backend : backends_) views_.push_back(backend.get());
}

absl::StatusOr<BackendRoute> BackendRouter::Choose(const MethodSpec& spec, int head_dim) const {
  absl::Status first_refusal;
  absl::Status last_refusal = absl::InternalError("kvcd has no backend");
  for (const std::unique_ptr<Backend>& backend : backends_) {
    absl::Status supported = backend->Supports(spec, head_dim);
    if (supported.ok()) return BackendRoute{backend.get(), std::move(first_refusal)};
    if (first_refusal.ok()) first_refusal = supported;
    last_refusal = std::move(supported);
  }
  return last_refusal;
}

}  // namespace kvcompress
