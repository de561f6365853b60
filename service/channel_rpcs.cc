#include "service/channel_rpcs.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "service/cuda_ipc_transport.h"

namespace kvcompress {
namespace {

RegionDescriptor DescriptorFromProto(const v1::CudaIpcRegion& region) {
  RegionDescriptor descriptor;
  descriptor.ipc_handle = region.ipc_handle();
  descriptor.size_bytes = region.size_bytes();
  descriptor.device_uuid = region.device_uuid();
  descriptor.pci_bus_id = region.pci_bus_id();
  descriptor.device_ordinal = region.device_ordinal();
  return descriptor;
}

std::string TransportName(v1::Transport transport) {
  switch (transport) {
    case v1::TRANSPORT_CUDA_IPC:
      return "cuda_ipc";
    case v1::TRANSPORT_NCCL:
      return "nccl";
    default:
      return "inline";
  }
}

absl::Status CheckRegistry(const ChannelEnvironment& environment) {
  if (environment.registry == nullptr) {
    return absl::FailedPreconditionError("this kvcd has no data-plane channels");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckChannelAccess(const ChannelEnvironment& environment, const CallIdentity& identity,
                                v1::Transport transport) {
  switch (transport) {
    case v1::TRANSPORT_CUDA_IPC:
      break;
    case v1::TRANSPORT_NCCL:
      return absl::UnimplementedError(
          "transport nccl: channels are not implemented in this version of kvcd; use "
          "TRANSPORT_CUDA_IPC on the same node or TRANSPORT_INLINE");
    case v1::TRANSPORT_UNSPECIFIED:
    case v1::TRANSPORT_INLINE:
      return absl::InvalidArgumentError(
          "transport: inline streams need no channel; OpenChannel takes TRANSPORT_CUDA_IPC");
    default:
      return absl::InvalidArgumentError(absl::StrCat("transport: unknown value ",
                                                     static_cast<int>(transport),
                                                     "; expected TRANSPORT_CUDA_IPC"));
  }
  if (!environment.cuda_ipc_compiled) {
    return absl::UnimplementedError(
        "transport cuda_ipc is not part of this build of kvcd (built without CUDA); use "
        "TRANSPORT_INLINE");
  }
  if (!environment.allow_cuda_ipc) {
    // UNIMPLEMENTED: "not supported/enabled in this service" (gRPC's status code guide).
    return absl::UnimplementedError(
        "transport cuda_ipc is disabled on this kvcd; the operator enables it with "
        "--allow_cuda_ipc (KVCD_ALLOW_CUDA_IPC=true)");
  }
  if (!identity.authenticated && environment.authentication_configured) {
    return absl::UnauthenticatedError(
        "transport cuda_ipc is only for authenticated peers: present the bearer token or a "
        "client certificate kvcd trusts");
  }
  return CheckRegistry(environment);
}

absl::StatusOr<v1::OpenChannelResponse> OpenChannel(const ChannelEnvironment& environment,
                                                    const CallIdentity& identity,
                                                    const v1::OpenChannelRequest& request) {
  absl::Status access = CheckChannelAccess(environment, identity, request.transport());
  if (!access.ok()) return access;
  if (environment.device_backend == nullptr) {
    return absl::FailedPreconditionError(
        "transport cuda_ipc needs kvcd's cuda backend (start kvcd with --backend=cuda)");
  }
  absl::StatusOr<std::unique_ptr<ChannelResources>> resources =
      environment.cuda_ipc_resources ? environment.cuda_ipc_resources(*environment.device_backend)
                                     : MakeCudaIpcResources(*environment.device_backend);
  if (!resources.ok()) return resources.status();
  absl::StatusOr<std::shared_ptr<Channel>> channel = environment.registry->Open(
      TransportName(request.transport()), ChannelOwnerFor(identity),
      absl::Seconds(request.idle_timeout_seconds()), std::move(resources).value());
  if (!channel.ok()) return channel.status();
  v1::OpenChannelResponse response;
  response.set_channel_id((*channel)->id());
  response.set_idle_timeout_seconds(
      static_cast<uint32_t>(absl::ToInt64Seconds((*channel)->idle_timeout())));
  for (int i = 0; i < request.regions_size(); ++i) {
    absl::StatusOr<uint32_t> region =
        (*channel)->AddRegion(DescriptorFromProto(request.regions(i)),
                              environment.registry->options().max_regions_per_channel);
    if (!region.ok()) {
      // Nothing half-made stays behind: the channel goes with the regions it opened.
      environment.registry->Close((*channel)->id(), (*channel)->owner()).IgnoreError();
      return absl::Status(region.status().code(),
                          absl::StrCat("regions[", i, "]: ", region.status().message()));
    }
    response.add_region_ids(*region);
  }
  return response;
}

absl::Status CloseChannel(const ChannelEnvironment& environment, const CallIdentity& identity,
                          const v1::CloseChannelRequest& request) {
  if (absl::Status status = CheckRegistry(environment); !status.ok()) return status;
  return environment.registry->Close(request.channel_id(), ChannelOwnerFor(identity));
}

absl::StatusOr<v1::RegisterRegionResponse> RegisterRegion(
    const ChannelEnvironment& environment, const CallIdentity& identity,
    const v1::RegisterRegionRequest& request) {
  if (absl::Status status = CheckRegistry(environment); !status.ok()) return status;
  absl::StatusOr<ChannelLease> lease =
      environment.registry->Acquire(request.channel_id(), ChannelOwnerFor(identity));
  if (!lease.ok()) return lease.status();
  absl::StatusOr<uint32_t> region =
      (*lease)->AddRegion(DescriptorFromProto(request.region()),
                          environment.registry->options().max_regions_per_channel);
  if (!region.ok()) return region.status();
  v1::RegisterRegionResponse response;
  response.set_region_id(*region);
  return response;
}

absl::StatusOr<ChannelLease> AcquireStreamChannel(const ChannelEnvironment& environment,
                                                  const CallIdentity& identity,
                                                  const v1::CompressHeader& header) {
  absl::Status access = CheckChannelAccess(environment, identity, header.transport());
  if (!access.ok()) return access;
  if (header.channel_id().empty()) {
    return absl::InvalidArgumentError(
        "channel_id: empty; a TRANSPORT_CUDA_IPC header names the channel OpenChannel returned");
  }
  return environment.registry->Acquire(header.channel_id(), ChannelOwnerFor(identity));
}

}  // namespace kvcompress
