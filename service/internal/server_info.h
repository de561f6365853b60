// The ServerInfo answer of GetServerInfo: every method stage the proto defines, whether this
// build runs it (CheckMethodImplemented), its parameters with their defaults (taken from
// kernels/method_spec.h so they never drift), dtypes, layouts, transports and limits.
// Pure and thread-safe.
#ifndef KVCOMPRESS_SERVICE_INTERNAL_SERVER_INFO_H_
#define KVCOMPRESS_SERVICE_INTERNAL_SERVER_INFO_H_

#include <string>

#include "kvcompress/v1/kvcompress.pb.h"
#include "service/server_limits.h"

namespace kvcompress {

v1::ServerInfo BuildServerInfo(const std::string& version, const std::string& backend_name,
                               const ServerLimits& limits, int worker_threads);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_INTERNAL_SERVER_INFO_H_
