// What a merging reducer leaves of one KV head: its output rows, each standing for one or more
// original tokens. Owned value type.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGED_HEAD_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGED_HEAD_H_

#include <cstdint>
#include <vector>

namespace kvcompress::cpu {

struct MergedHead {
  std::vector<int32_t> positions;  // [rows] ascending: the position each row keeps
  std::vector<int32_t> merged;     // [rows] original tokens folded into each row (≥ 1)
  // [rows, D] fp32 results for the rows with merged > 1; rows with merged == 1 are unused
  // (zero) and the row is copied byte for byte from the input. `keys` is empty when the
  // reducer leaves every key as it was.
  std::vector<float> keys;
  std::vector<float> values;
};

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_MERGED_HEAD_H_
