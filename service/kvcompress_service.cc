#include "service/kvcompress_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "service/status_conversion.h"

namespace kvcompress {
namespace {

// A Compress stream refused before it starts: finishes at once with `status`, reads nothing.
class RejectedStream final
    : public grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse> {
 public:
  explicit RejectedStream(const absl::Status& status) { Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

// Checks the call; logs and returns the failure.
absl::StatusOr<CallIdentity> AuthenticateCall(const CompressEnvironment& environment,
                                              const grpc::CallbackServerContext& context,
                                              absl::string_view rpc) {
  if (environment.authenticator == nullptr) return CallIdentity();
  absl::StatusOr<CallIdentity> identity = environment.authenticator->Authenticate(context);
  if (!identity.ok() && environment.log != nullptr) {
    environment.log->Emit("auth_failure",
                          {{"rpc", std::string(rpc)},
                           {"peer", context.peer()},
                           {"code", absl::StatusCodeToString(identity.status().code())},
                           {"reason", std::string(identity.status().message())}});
  }
  return identity;
}

}  // namespace

KvCompressService::KvCompressService(const CompressEnvironment& environment, v1::ServerInfo info)
    : environment_(environment), info_(std::move(info)) {}

grpc::ServerUnaryReactor* KvCompressService::GetServerInfo(grpc::CallbackServerContext* context,
                                                           const v1::GetServerInfoRequest*,
                                                           v1::ServerInfo* response) {
  if (absl::StatusOr<CallIdentity> identity =
          AuthenticateCall(environment_, *context, "GetServerInfo");
      !identity.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(identity.status()));
    return reactor;
  }
  *response = info_;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse>* KvCompressService::Compress(
    grpc::CallbackServerContext* context) {
  absl::StatusOr<CallIdentity> identity = AuthenticateCall(environment_, *context, "Compress");
  if (!identity.ok()) return new RejectedStream(identity.status());
  const uint32_t open = open_streams_.fetch_add(1) + 1;
  absl::Status admission;
  if (draining_.load()) {
    admission = absl::UnavailableError("kvcd is shutting down; retry on another server");
  } else if (open > environment_.limits.max_concurrent_streams) {
    admission = absl::ResourceExhaustedError(absl::StrCat(
        "too many concurrent Compress streams: this would be stream ", open, ", the limit is ",
        environment_.limits.max_concurrent_streams, " (--max_concurrent_streams); retry later"));
  }
  return new CompressReactor(
      context, environment_, std::move(admission), [this] { open_streams_.fetch_sub(1); },
      *std::move(identity));
}

}  // namespace kvcompress
