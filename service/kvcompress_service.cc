#include "service/kvcompress_service.h"

#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "service/channel_rpcs.h"
#include "service/forward_listener.h"
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

KvCompressService::KvCompressService(const CompressEnvironment& environment,
                                     std::function<v1::ServerInfo()> server_info)
    : environment_(environment), server_info_(std::move(server_info)) {}

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
  *response = server_info_();
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

namespace {

// The three channel RPCs: authenticate, run `body` (returns absl::Status or StatusOr<Response>),
// finish with its status.
template <typename Response, typename Body>
grpc::ServerUnaryReactor* RunChannelCall(const CompressEnvironment& environment,
                                         grpc::CallbackServerContext* context,
                                         absl::string_view rpc, Response* response, Body body) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<CallIdentity> identity = AuthenticateCall(environment, *context, rpc);
  if (!identity.ok()) {
    reactor->Finish(ToGrpcStatus(identity.status()));
    return reactor;
  }
  auto result = body(*identity);
  if constexpr (std::is_same_v<decltype(result), absl::Status>) {
    reactor->Finish(ToGrpcStatus(result));
  } else {
    if (result.ok()) *response = *std::move(result);
    reactor->Finish(ToGrpcStatus(result.status()));
  }
  return reactor;
}

}  // namespace

grpc::ServerUnaryReactor* KvCompressService::OpenChannel(grpc::CallbackServerContext* context,
                                                         const v1::OpenChannelRequest* request,
                                                         v1::OpenChannelResponse* response) {
  return RunChannelCall(environment_, context, "OpenChannel", response,
                        [&](const CallIdentity& identity) {
                          return kvcompress::OpenChannel(environment_.channels, identity, *request);
                        });
}

grpc::ServerUnaryReactor* KvCompressService::CloseChannel(grpc::CallbackServerContext* context,
                                                          const v1::CloseChannelRequest* request,
                                                          v1::CloseChannelResponse* response) {
  return RunChannelCall(
      environment_, context, "CloseChannel", response, [&](const CallIdentity& identity) {
        return kvcompress::CloseChannel(environment_.channels, identity, *request);
      });
}

grpc::ServerUnaryReactor* KvCompressService::RegisterRegion(
    grpc::CallbackServerContext* context, const v1::RegisterRegionRequest* request,
    v1::RegisterRegionResponse* response) {
  return RunChannelCall(
      environment_, context, "RegisterRegion", response, [&](const CallIdentity& identity) {
        return kvcompress::RegisterRegion(environment_.channels, identity, *request);
      });
}

grpc::ServerWriteReactor<v1::ForwardNotice>* KvCompressService::ReceiveForwarded(
    grpc::CallbackServerContext* context, const v1::ReceiveForwardedRequest* request) {
  return new ForwardListenerReactor(environment_.channels,
                                    AuthenticateCall(environment_, *context, "ReceiveForwarded"),
                                    *request);
}

}  // namespace kvcompress
