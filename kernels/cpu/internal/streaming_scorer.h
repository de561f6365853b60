// StreamingLLM scores: the first `sinks` tokens score +inf, every other token its position, so
// a budget of n keeps the first min(sinks, n) tokens and the most recent rest. Positions are
// exact in fp32 up to 2^24 tokens. Pure function; thread-safe.
#ifndef KVCOMPRESS_KERNELS_CPU_INTERNAL_STREAMING_SCORER_H_
#define KVCOMPRESS_KERNELS_CPU_INTERNAL_STREAMING_SCORER_H_

#include <span>

namespace kvcompress::cpu {

// Fills all of `scores` (one entry per token).
void ScoreStreaming(int sinks, std::span<float> scores);

}  // namespace kvcompress::cpu

#endif  // KVCOMPRESS_KERNELS_CPU_INTERNAL_STREAMING_SCORER_H_
