#include "kernels/backend.h"

#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvcompress {

absl::Status Backend::Supports(const MethodSpec& spec, int head_dim) const {
  (void)head_dim;
  return CheckMethodImplemented(spec);
}

absl::Status ValidateLayerJobInput(const LayerJob& job, size_t index) {
  const auto error = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("jobs[", index, "] (sequence ", job.sequence,
                                                   " layer ", job.layer, "): ", parts...));
  };
  const SequenceShape& shape = job.input.shape;
  if (shape.num_tokens < 1 || shape.num_tokens > std::numeric_limits<int32_t>::max()) {
    return error("num_tokens ", shape.num_tokens, " is out of range; expected 1 <= T <= 2^31-1");
  }
  if (job.input.keys == nullptr || job.input.values == nullptr) {
    return error("keys and values are required");
  }
  if (shape.num_window_queries < 0 || shape.num_window_queries > shape.num_tokens) {
    return error("num_window_queries ", shape.num_window_queries,
                 " is out of range; expected 0 <= W <= num_tokens ", shape.num_tokens);
  }
  if (shape.num_window_queries > 0 && job.input.queries == nullptr) {
    return error("num_window_queries is ", shape.num_window_queries, " but no queries were given");
  }
  return absl::OkStatus();
}

}  // namespace kvcompress
