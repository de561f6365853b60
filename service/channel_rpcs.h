// The channel RPCs of kvcompress.v1.KvCompress (OpenChannel, CloseChannel, RegisterRegion) as
// plain functions over a ChannelEnvironment, so that the rules are tested without gRPC;
// KvCompressService wraps them after authenticating the call.
//
// Who may open a channel (DESIGN §7 "GPU transports only for authenticated peers"):
//  - the transport must be built and enabled by the operator (cuda_ipc: --allow_cuda_ipc,
//    nccl: --allow_nccl),
//    else UNIMPLEMENTED ("not supported/enabled in this service", gRPC's definition), and
//    kvcd must run the CUDA backend (FAILED_PRECONDITION);
//  - the peer must be authenticated (bearer token or verified client certificate), else
//    UNAUTHENTICATED — with one exception: a kvcd that requires no authentication at all
//    (neither --auth_token_file nor --tls_client_ca) and was started with --allow_cuda_ipc or
//    --allow_nccl lets every peer open channels. That is the single-tenant node where kvcd listens
//    on localhost beside its prefill workers; kvcd logs a warning at start-up saying so.
// A channel then belongs to ChannelOwnerFor(identity): only that principal can use, extend or
// close it (PERMISSION_DENIED for others). Unknown ids are FAILED_PRECONDITION. The one
// exception is forwarding: a prefill client allowed to open nccl channels forwards into a
// decode worker's channel by its id alone (AcquireForwardChannel) — the id is a 128-bit
// secret the decode worker hands out.
//
// Thread safety: as the registry's.
#ifndef KVCOMPRESS_SERVICE_CHANNEL_RPCS_H_
#define KVCOMPRESS_SERVICE_CHANNEL_RPCS_H_

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/call_authenticator.h"
#include "service/channel_registry.h"
#include "service/cuda_ipc_transport.h"
#include "service/nccl_transport.h"

namespace kvcompress {

// Makes a cuda_ipc channel's resources on the device backend (MakeCudaIpcResources; tests
// substitute host memory).
using ChannelResourceFactory =
    std::function<absl::StatusOr<std::unique_ptr<ChannelResources>>(Backend& backend)>;

// Makes kvcd's end of an nccl channel (MakeNcclLink; tests substitute their own links).
using NcclLinkFactory = std::function<absl::StatusOr<std::unique_ptr<NcclLink>>(
    Backend& backend, absl::string_view unique_id, ChannelDirection direction)>;

struct ChannelEnvironment {
  ChannelRegistry* registry = nullptr;  // null: no channels (every channel RPC fails)
  Backend* device_backend = nullptr;    // the backend that reads channel memory (cuda)
  bool allow_cuda_ipc = false;          // --allow_cuda_ipc
  // Whether kvcd requires authentication at all (a token or client certificates).
  bool authentication_configured = false;
  ChannelResourceFactory cuda_ipc_resources;  // null: MakeCudaIpcResources
  // Whether the build has cuda_ipc (CudaIpcCompiled(); tests of the rules set it).
  bool cuda_ipc_compiled = CudaIpcCompiled();
  bool allow_nccl = false;     // --allow_nccl
  NcclLinkFactory nccl_links;  // null: MakeNcclLink
  bool nccl_compiled = NcclCompiled();
  // Bound on every NCCL wait of a stream without a (nearer) deadline (--nccl_timeout).
  absl::Duration nccl_timeout = absl::Seconds(120);
};

// OK when `identity` may open (or use) channels of `transport`; the status above otherwise.
absl::Status CheckChannelAccess(const ChannelEnvironment& environment, const CallIdentity& identity,
                                v1::Transport transport);

absl::StatusOr<v1::OpenChannelResponse> OpenChannel(const ChannelEnvironment& environment,
                                                    const CallIdentity& identity,
                                                    const v1::OpenChannelRequest& request);

absl::Status CloseChannel(const ChannelEnvironment& environment, const CallIdentity& identity,
                          const v1::CloseChannelRequest& request);

absl::StatusOr<v1::RegisterRegionResponse> RegisterRegion(const ChannelEnvironment& environment,
                                                          const CallIdentity& identity,
                                                          const v1::RegisterRegionRequest& request);

// The channel a cuda_ipc or nccl Compress header names, leased for the stream; access checked
// as for OpenChannel. INVALID_ARGUMENT when the header names none, or a channel of another
// transport or (nccl) of direction FROM_KVCD.
absl::StatusOr<ChannelLease> AcquireStreamChannel(const ChannelEnvironment& environment,
                                                  const CallIdentity& identity,
                                                  const v1::CompressHeader& header);

// The channel a header's forward_channel_id names, leased for the stream: the caller must be
// allowed to open nccl channels; the channel must be an nccl channel of direction FROM_KVCD
// (INVALID_ARGUMENT otherwise) whose decode worker is listening (FAILED_PRECONDITION).
absl::StatusOr<ChannelLease> AcquireForwardChannel(const ChannelEnvironment& environment,
                                                   const CallIdentity& identity,
                                                   const v1::CompressHeader& header);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_CHANNEL_RPCS_H_
