// Limits kvcd enforces on every Compress stream (RESOURCE_EXHAUSTED past them) and the
// defaults its flags use.
#ifndef KVCOMPRESS_SERVICE_SERVER_LIMITS_H_
#define KVCOMPRESS_SERVICE_SERVER_LIMITS_H_

#include <cstdint>

namespace kvcompress {

struct ServerLimits {
  uint64_t max_request_bytes = uint64_t{16} << 30;  // tensor bytes a header may announce
  uint64_t max_tokens = 1 << 20;                    // per sequence
  uint32_t max_layers = 512;
  uint32_t max_sequences = 256;
  uint32_t max_concurrent_streams = 64;  // Compress streams open at once
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_SERVER_LIMITS_H_
