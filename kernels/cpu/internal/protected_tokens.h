// The tokens every scorer must keep on request (MethodSpec::protect_sinks and
// protect_recent): they are raised to +inf. Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_PROTECTED_TOKENS_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_PROTECTED_TOKENS_H_

#include <span>

namespace kvcompress::cpu {

// Sets the first `sinks` and the last `recent` of `scores` to +inf (counts past the end are
// clipped; negative counts protect nothing).
void ProtectTokens(int sinks, int recent, std::span<float> scores);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_PROTECTED_TOKENS_H_
