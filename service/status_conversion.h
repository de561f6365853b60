// The one mapping from absl::Status (used everywhere inside kvcompress) to grpc::Status (the
// edge). Both use the canonical code numbers, so the code carries over unchanged and the
// message is preserved byte for byte. Pure and thread-safe.
#ifndef KVCOMPRESS_SERVICE_STATUS_CONVERSION_H_
#define KVCOMPRESS_SERVICE_STATUS_CONVERSION_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kvcompress {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_STATUS_CONVERSION_H_
