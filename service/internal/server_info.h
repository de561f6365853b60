// The ServerInfo answer of GetServerInfo: every method stage the proto defines, whether this
// build runs it (CheckMethodImplemented) and which of kvcd's backends run it themselves, its parameters with their defaults (taken from
// kernels/method_spec.h so they never drift), dtypes, layouts, transports and limits.
// Pure and thread-safe.
#ifndef KVCOMPRESS_SERVICE_INTERNAL_SERVER_INFO_H_
#define KVCOMPRESS_SERVICE_INTERNAL_SERVER_INFO_H_

#include <span>
#include <string>

#include "kernels/backend.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/server_limits.h"

namespace kvcompress {

// `backends` in kvcd's order of preference (the first is ServerInfo.backend); devices report
// memory in use at the time of the call.
v1::ServerInfo BuildServerInfo(const std::string& version,
                               std::span<const Backend* const> backends,
                               const ServerLimits& limits, int worker_threads);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_INTERNAL_SERVER_INFO_H_
