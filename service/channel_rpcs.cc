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
  const std::string name = TransportName(transport);
  bool compiled = false, allowed = false;
  const char* flag = "";
  switch (transport) {
    case v1::TRANSPORT_CUDA_IPC:
      compiled = environment.cuda_ipc_compiled;
      allowed = environment.allow_cuda_ipc;
      flag = "--allow_cuda_ipc (KVCD_ALLOW_CUDA_IPC=true)";
      break;
    case v1::TRANSPORT_NCCL:
      compiled = environment.nccl_compiled;
      allowed = environment.allow_nccl;
      flag = "--allow_nccl (KVCD_ALLOW_NCCL=true)";
      break;
    case v1::TRANSPORT_UNSPECIFIED:
    case v1::TRANSPORT_INLINE:
      return absl::InvalidArgumentError(
          "transport: inline streams need no channel; OpenChannel takes TRANSPORT_CUDA_IPC or "
          "TRANSPORT_NCCL");
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("transport: unknown value ", static_cast<int>(transport),
                       "; expected TRANSPORT_CUDA_IPC or TRANSPORT_NCCL"));
  }
  if (!compiled) {
    return absl::UnimplementedError(absl::StrCat(
        "transport ", name, " is not part of this build of kvcd (built without ",
        transport == v1::TRANSPORT_NCCL ? "CUDA or NCCL" : "CUDA", "); use TRANSPORT_INLINE"));
  }
  if (!allowed) {
    // UNIMPLEMENTED: "not supported/enabled in this service" (gRPC's status code guide).
    return absl::UnimplementedError(absl::StrCat("transport ", name,
                                                 " is disabled on this kvcd; the operator "
                                                 "enables it with ",
                                                 flag));
  }
  if (!identity.authenticated && environment.authentication_configured) {
    return absl::UnauthenticatedError(
        absl::StrCat("transport ", name,
                     " is only for authenticated peers: present the bearer token or a client "
                     "certificate kvcd trusts"));
  }
  return CheckRegistry(environment);
}

namespace {

absl::StatusOr<ChannelDirection> DirectionFromProto(v1::ChannelDirection direction) {
  switch (direction) {
    case v1::CHANNEL_DIRECTION_UNSPECIFIED:
    case v1::CHANNEL_DIRECTION_TO_KVCD:
      return ChannelDirection::kToKvcd;
    case v1::CHANNEL_DIRECTION_FROM_KVCD:
      return ChannelDirection::kFromKvcd;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("nccl.direction: unknown value ", static_cast<int>(direction),
                       "; expected CHANNEL_DIRECTION_TO_KVCD or CHANNEL_DIRECTION_FROM_KVCD"));
  }
}

absl::StatusOr<std::unique_ptr<ChannelResources>> MakeResources(
    const ChannelEnvironment& environment, const v1::OpenChannelRequest& request) {
  Backend& backend = *environment.device_backend;
  if (request.transport() == v1::TRANSPORT_CUDA_IPC) {
    if (request.has_nccl()) {
      return absl::InvalidArgumentError("nccl: set only for TRANSPORT_NCCL channels");
    }
    return environment.cuda_ipc_resources ? environment.cuda_ipc_resources(backend)
                                          : MakeCudaIpcResources(backend);
  }
  if (request.regions_size() > 0) {
    return absl::InvalidArgumentError(
        "regions: nccl channels have no regions (the tensors travel over the communicator)");
  }
  if (!request.has_nccl() || request.nccl().unique_id().empty()) {
    return absl::InvalidArgumentError(
        "nccl.unique_id: empty; a TRANSPORT_NCCL channel needs the ncclUniqueId the client got "
        "from ncclGetUniqueId (128 bytes)");
  }
  if (request.nccl().unique_id().size() != kNcclUniqueIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("nccl.unique_id: expected ", kNcclUniqueIdBytes,
                                                   " bytes (an ncclUniqueId), got ",
                                                   request.nccl().unique_id().size()));
  }
  absl::StatusOr<ChannelDirection> direction = DirectionFromProto(request.nccl().direction());
  if (!direction.ok()) return direction.status();
  absl::StatusOr<std::unique_ptr<NcclLink>> link =
      environment.nccl_links
          ? environment.nccl_links(backend, request.nccl().unique_id(), *direction)
          : MakeNcclLink(backend, request.nccl().unique_id(), *direction);
  if (!link.ok()) return link.status();
  return MakeNcclChannelResources(std::move(link).value());
}

}  // namespace

absl::StatusOr<v1::OpenChannelResponse> OpenChannel(const ChannelEnvironment& environment,
                                                    const CallIdentity& identity,
                                                    const v1::OpenChannelRequest& request) {
  absl::Status access = CheckChannelAccess(environment, identity, request.transport());
  if (!access.ok()) return access;
  if (environment.device_backend == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("transport ", TransportName(request.transport()),
                     " needs kvcd's cuda backend (start kvcd with --backend=cuda)"));
  }
  absl::StatusOr<std::unique_ptr<ChannelResources>> resources = MakeResources(environment, request);
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
  const std::string transport = TransportName(header.transport());
  if (header.channel_id().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "channel_id: empty; a ", transport, " header names the channel OpenChannel returned"));
  }
  absl::StatusOr<ChannelLease> lease =
      environment.registry->Acquire(header.channel_id(), ChannelOwnerFor(identity));
  if (!lease.ok()) return lease.status();
  if ((*lease)->transport() != transport) {
    return absl::InvalidArgumentError(
        absl::StrCat("channel_id: channel ", header.channel_id(), " is a ", (*lease)->transport(),
                     " channel, the header's transport is ", transport));
  }
  if (header.transport() == v1::TRANSPORT_NCCL) {
    NcclLink* link = (*lease)->resources().nccl_link();
    if (link == nullptr || link->direction() != ChannelDirection::kToKvcd) {
      return absl::InvalidArgumentError(absl::StrCat(
          "channel_id: channel ", header.channel_id(),
          " was opened with direction CHANNEL_DIRECTION_FROM_KVCD (it receives forwarded "
          "caches); send caches over a channel opened with CHANNEL_DIRECTION_TO_KVCD"));
    }
  }
  return lease;
}

absl::StatusOr<ChannelLease> AcquireForwardChannel(const ChannelEnvironment& environment,
                                                   const CallIdentity& identity,
                                                   const v1::CompressHeader& header) {
  absl::Status access = CheckChannelAccess(environment, identity, v1::TRANSPORT_NCCL);
  if (!access.ok()) {
    return absl::Status(access.code(), absl::StrCat("forward_channel_id: ", access.message()));
  }
  absl::StatusOr<ChannelLease> lease =
      environment.registry->AcquireById(header.forward_channel_id());
  if (!lease.ok()) {
    return absl::Status(lease.status().code(),
                        absl::StrCat("forward_channel_id: ", lease.status().message()));
  }
  ForwardOutbox* outbox = (*lease)->resources().forward_outbox();
  if (outbox == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "forward_channel_id: channel ", header.forward_channel_id(),
        " is not an nccl channel opened with CHANNEL_DIRECTION_FROM_KVCD (a decode worker's)"));
  }
  if (!outbox->has_listener()) {
    return absl::FailedPreconditionError(
        absl::StrCat("forward_channel_id: channel ", header.forward_channel_id(),
                     " has no listener; its decode worker must call ReceiveForwarded first"));
  }
  return lease;
}

}  // namespace kvcompress
