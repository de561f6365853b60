#include "service/kvcompress_service.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcompress {

KvCompressService::KvCompressService(const CompressEnvironment& environment, v1::ServerInfo info)
    : environment_(environment), info_(std::move(info)) {}

grpc::ServerUnaryReactor* KvCompressService::GetServerInfo(grpc::CallbackServerContext* context,
                                                           const v1::GetServerInfoRequest*,
                                                           v1::ServerInfo* response) {
  *response = info_;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse>* KvCompressService::Compress(
    grpc::CallbackServerContext* context) {
  const uint32_t open = open_streams_.fetch_add(1) + 1;
  absl::Status admission;
  if (draining_.load()) {
    admission = absl::UnavailableError("kvcd is shutting down; retry on another server");
  } else if (open > environment_.limits.max_concurrent_streams) {
    admission = absl::ResourceExhaustedError(absl::StrCat(
        "too many concurrent Compress streams: this would be stream ", open, ", the limit is ",
        environment_.limits.max_concurrent_streams, " (--max_concurrent_streams); retry later"));
  }
  return new CompressReactor(context, environment_, std::move(admission),
                             [this] { open_streams_.fetch_sub(1); });
}

}  // namespace kvcompress
