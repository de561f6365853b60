// CheckCudaMethodSupported: what the CUDA backend runs, compiled with or without CUDA.
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_backend.h"

namespace kvcompress {

absl::Status CheckCudaMethodSupported(const MethodSpec& spec, int head_dim) {
  switch (spec.scorer) {
    case ScorerKind::kSnapKv:
    case ScorerKind::kKnorm:
    case ScorerKind::kStreaming:
    case ScorerKind::kKeyDiff:
    case ScorerKind::kObserved:
    case ScorerKind::kTova:
      break;
    default:
      return absl::UnimplementedError(
          absl::StrCat("scorer ", std::string(ScorerName(spec.scorer)),
                       " is not implemented by the cuda backend; it runs snapkv, knorm, streaming, "
                       "keydiff and observed"));
  }
  if (spec.head_budget != HeadBudgetKind::kUniform &&
      spec.head_budget != HeadBudgetKind::kAdaptive) {
    return absl::UnimplementedError(absl::StrCat(
        "head budget ", std::string(HeadBudgetName(spec.head_budget)),
        " is not implemented by the cuda backend; it runs uniform and adaptive head budgets"));
  }
  if (spec.reducer != ReducerKind::kDrop && spec.reducer != ReducerKind::kMergeSimilar &&
      spec.reducer != ReducerKind::kMergeNearest) {
    return absl::UnimplementedError(absl::StrCat("reducer ", std::string(ReducerName(spec.reducer)),
                                                 " is not implemented by the cuda backend; it "
                                                 "runs drop, merge_similar and merge_nearest"));
  }
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) {
    return absl::UnimplementedError(absl::StrCat(
        "head_dim ", head_dim, " is not implemented by the cuda backend; expected 64, 128 or 256"));
  }
  return absl::OkStatus();
}

}  // namespace kvcompress
