// KvCompressService: the kvcompress.v1.KvCompress callback service.
//
// GetServerInfo answers from `server_info`, called per request (device memory in use is
// current). Compress creates one
// CompressReactor per stream; a stream beyond max_concurrent_streams, or any stream once
// draining has started, is refused at once (RESOURCE_EXHAUSTED / UNAVAILABLE).
//
// Authentication: when the environment has a CallAuthenticator, both handlers check the call
// first (call_authenticator.h says why here and not in an AuthMetadataProcessor); a call
// that fails gets UNAUTHENTICATED before any request byte is read, and an "auth_failure"
// event is logged with the peer and the reason (never the token). The grpc.health.v1 and
// reflection services of the same server are not checked: Kubernetes probes carry no token.
//
// Thread safety: gRPC calls the handlers concurrently; the service's own state is atomic.
// The environment's objects must outlive the service, and the service must outlive every
// reactor it created (grpc::Server::Shutdown waits for them).
#ifndef KVCOMPRESS_SERVICE_KVCOMPRESS_SERVICE_H_
#define KVCOMPRESS_SERVICE_KVCOMPRESS_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>

#include "kvcompress/v1/kvcompress.grpc.pb.h"
#include "service/compress_reactor.h"

namespace kvcompress {

class KvCompressService final : public v1::KvCompress::CallbackService {
 public:
  KvCompressService(const CompressEnvironment& environment,
                    std::function<v1::ServerInfo()> server_info);
  KvCompressService(const KvCompressService&) = delete;
  KvCompressService& operator=(const KvCompressService&) = delete;

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

  grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse>* Compress(
      grpc::CallbackServerContext* context) override;

  // Channels of GPU transports: service/channel_rpcs.h (after the same authentication).
  grpc::ServerUnaryReactor* OpenChannel(grpc::CallbackServerContext* context,
                                        const v1::OpenChannelRequest* request,
                                        v1::OpenChannelResponse* response) override;
  grpc::ServerUnaryReactor* CloseChannel(grpc::CallbackServerContext* context,
                                         const v1::CloseChannelRequest* request,
                                         v1::CloseChannelResponse* response) override;
  grpc::ServerUnaryReactor* RegisterRegion(grpc::CallbackServerContext* context,
                                           const v1::RegisterRegionRequest* request,
                                           v1::RegisterRegionResponse* response) override;
  grpc::ServerWriteReactor<v1::ForwardNotice>* ReceiveForwarded(
      grpc::CallbackServerContext* context, const v1::ReceiveForwardedRequest* request) override;

  // New streams are refused with UNAVAILABLE from now on.
  void StartDraining() { draining_.store(true); }
  uint32_t open_streams() const { return open_streams_.load(); }

 private:
  const CompressEnvironment environment_;
  const std::function<v1::ServerInfo()> server_info_;
  std::atomic<uint32_t> open_streams_{0};
  std::atomic<bool> draining_{false};
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_KVCOMPRESS_SERVICE_H_
