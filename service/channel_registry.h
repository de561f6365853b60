// ChannelRegistry: the data-plane channels of GPU transports (OpenChannel / CloseChannel).
//
// A channel is a capability: an unguessable id (128 random bits, 32 hex digits, from
// OpenSSL's RAND_bytes) owned by the principal that opened it (ChannelOwnerFor), holding the
// transport's resources (cuda_ipc: the client's device regions opened in kvcd's address
// space) behind the ChannelResources interface. The registry itself knows nothing of CUDA,
// so every rule here is unit-tested on the CPU.
//
// Lifetime. gRPC's callback API tells a server nothing when a client's connection goes away,
// so a channel lives until (a) CloseChannel, or (b) it has been idle — no lease held, no call
// naming it — for its idle timeout; expiry is checked lazily on every registry call and by
// a reaper thread (StartReaper). A Compress stream that uses a channel holds a ChannelLease
// for its whole life: a leased channel never expires, and a channel closed while leased is
// removed from the table at once (new calls get FAILED_PRECONDITION) but releases its
// resources only when the last lease ends, so no stream ever reads an unmapped region.
// ChannelResources::Release runs exactly once per channel, on whichever thread drops the last
// reference, never with the registry's lock held.
//
// Errors: FAILED_PRECONDITION for an unknown, closed or expired channel id (DESIGN §7);
// PERMISSION_DENIED for a channel another principal owns; RESOURCE_EXHAUSTED past
// max_channels or max_regions_per_channel; INVALID_ARGUMENT for slices out of a region's
// bounds, misaligned or of the wrong size, naming the field.
//
// Thread safety: ChannelRegistry and Channel are thread-safe. A ChannelLease is used by one
// stream at a time.
#ifndef KVCOMPRESS_SERVICE_CHANNEL_REGISTRY_H_
#define KVCOMPRESS_SERVICE_CHANNEL_REGISTRY_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "service/call_authenticator.h"

namespace kvcompress {

class NcclLink;
class ForwardOutbox;

// The principal that owns channels opened by a call: "cert:<subject>" for a verified client
// certificate, "token" for a bearer token (kvcd has one token, so all its holders are one
// principal), "anonymous" for a kvcd without any authentication (only where the operator
// allowed channels for unauthenticated peers).
std::string ChannelOwnerFor(const CallIdentity& identity);

// A region as the client describes it (cuda_ipc: CudaIpcRegion of the proto).
struct RegionDescriptor {
  std::string ipc_handle;  // cudaIpcMemHandle_t bytes
  uint64_t size_bytes = 0;
  std::string device_uuid;
  std::string pci_bus_id;
  int device_ordinal = -1;
};

// Alignment every slice's offset (and so its device address, regions being allocation bases)
// must have: the kernels read 16-byte vectors.
inline constexpr uint64_t kRegionSliceAlignment = 16;

// What a transport holds for one channel.
class ChannelResources {
 public:
  virtual ~ChannelResources() = default;
  // Makes `region` addressable by kvcd and returns its base address (cuda_ipc:
  // cudaIpcOpenMemHandle on the backend's device). INVALID_ARGUMENT / FAILED_PRECONDITION
  // naming what is wrong with the region; the channel stays usable after a failure.
  virtual absl::StatusOr<std::byte*> OpenRegion(const RegionDescriptor& region) = 0;
  // Releases everything OpenRegion opened. Called exactly once, when the channel is torn down.
  virtual void Release() = 0;
  // nccl channels: kvcd's end of the communicator (null for other transports).
  virtual NcclLink* nccl_link() { return nullptr; }
  // nccl channels of direction FROM_KVCD: where forwarded layers go (null otherwise).
  virtual ForwardOutbox* forward_outbox() { return nullptr; }
};

// One region of a channel.
struct ChannelRegion {
  std::byte* base = nullptr;
  uint64_t size_bytes = 0;
};

class Channel final {
 public:
  Channel(std::string id, std::string transport, std::string owner, absl::Duration idle_timeout,
          std::unique_ptr<ChannelResources> resources);
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  // Releases the resources.
  ~Channel();

  const std::string& id() const { return id_; }
  const std::string& transport() const { return transport_; }
  const std::string& owner() const { return owner_; }
  absl::Duration idle_timeout() const { return idle_timeout_; }

  // Opens and registers a region; returns its id (0, 1, ...). RESOURCE_EXHAUSTED past
  // `max_regions`; INVALID_ARGUMENT for size 0; the resources' errors as they are.
  absl::StatusOr<uint32_t> AddRegion(const RegionDescriptor& region, size_t max_regions);

  // The address of bytes [offset, offset + bytes) of region `region` after checking: the
  // region exists, offset is a multiple of kRegionSliceAlignment, bytes == expected_bytes and
  // the slice lies inside the region. INVALID_ARGUMENT naming `field` ("sequence 0 layer 3
  // keys") with the value received and what was expected.
  absl::StatusOr<std::byte*> ResolveSlice(uint32_t region, uint64_t offset, uint64_t bytes,
                                          uint64_t expected_bytes, absl::string_view field) const;

  // The address of [offset, offset + capacity) of region `region` for kvcd to write into
  // (an output slice): the region exists, offset is a multiple of kRegionSliceAlignment, the
  // slice lies inside the region and is not empty. INVALID_ARGUMENT naming `field`.
  absl::StatusOr<std::byte*> ResolveWritableSlice(uint32_t region, uint64_t offset,
                                                  uint64_t capacity, absl::string_view field) const;

  size_t num_regions() const;

  // The transport's resources; valid for the channel's life.
  ChannelResources& resources() const { return *resources_view_; }

 private:
  const std::string id_;
  const std::string transport_;
  const std::string owner_;
  const absl::Duration idle_timeout_;
  // Serialises OpenRegion calls and guards the table.
  mutable absl::Mutex mu_;
  std::unique_ptr<ChannelResources> resources_ ABSL_GUARDED_BY(mu_);
  ChannelResources* const resources_view_;  // resources_.get(), readable without the lock
  std::vector<ChannelRegion> regions_ ABSL_GUARDED_BY(mu_);
};

class ChannelRegistry;

// Keeps a channel alive and un-expirable while a stream uses it. Move-only; an empty lease
// holds nothing.
class ChannelLease final {
 public:
  ChannelLease() = default;
  ChannelLease(ChannelLease&& other) noexcept;
  ChannelLease& operator=(ChannelLease&& other) noexcept;
  ChannelLease(const ChannelLease&) = delete;
  ChannelLease& operator=(const ChannelLease&) = delete;
  ~ChannelLease() { Reset(); }

  Channel* get() const { return channel_.get(); }
  Channel* operator->() const { return channel_.get(); }
  explicit operator bool() const { return channel_ != nullptr; }
  // Ends the lease now (the channel's idle time starts counting).
  void Reset();

 private:
  friend class ChannelRegistry;
  ChannelLease(ChannelRegistry* registry, std::shared_ptr<Channel> channel)
      : registry_(registry), channel_(std::move(channel)) {}

  ChannelRegistry* registry_ = nullptr;
  std::shared_ptr<Channel> channel_;
};

struct ChannelRegistryOptions {
  size_t max_channels = 64;                        // --max_channels
  absl::Duration idle_timeout = absl::Minutes(5);  // --channel_idle_timeout; also the cap
  size_t max_regions_per_channel = 256;
  // The time source for idle expiry; null: absl::Now (tests inject their own).
  std::function<absl::Time()> clock;
};

class ChannelRegistry final {
 public:
  explicit ChannelRegistry(ChannelRegistryOptions options);
  ChannelRegistry(const ChannelRegistry&) = delete;
  ChannelRegistry& operator=(const ChannelRegistry&) = delete;
  // Stops the reaper; channels still open are released (after their last lease).
  ~ChannelRegistry();

  const ChannelRegistryOptions& options() const { return options_; }

  // A new channel of `transport` owned by `owner`, idle timeout `requested_idle_timeout`
  // (zero or above the server's: the server's). RESOURCE_EXHAUSTED at max_channels (after
  // expiring idle ones). The resources are released at once on failure.
  absl::StatusOr<std::shared_ptr<Channel>> Open(std::string transport, std::string owner,
                                                absl::Duration requested_idle_timeout,
                                                std::unique_ptr<ChannelResources> resources);

  // The channel `id` for `owner`, leased; its idle clock restarts.
  absl::StatusOr<ChannelLease> Acquire(absl::string_view id, absl::string_view owner);

  // The channel `id` whoever owns it, leased: for forwarding, where the channel id itself is
  // the capability a decode worker hands to its prefill peers. FAILED_PRECONDITION when
  // unknown. The idle clock restarts.
  absl::StatusOr<ChannelLease> AcquireById(absl::string_view id);

  // Removes the channel; its resources go once its leases end.
  absl::Status Close(absl::string_view id, absl::string_view owner);

  // Removes every channel idle for its timeout; returns how many.
  int ExpireIdle();

  // Runs ExpireIdle every `interval` on a thread of its own until the registry is destroyed.
  void StartReaper(absl::Duration interval);

  // Open channels of `transport` ("cuda_ipc"), or of all transports when empty.
  size_t OpenChannels(absl::string_view transport = {}) const;

 private:
  friend class ChannelLease;
  struct Entry {
    std::shared_ptr<Channel> channel;
    int leases = 0;
    absl::Time last_used;
  };

  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }
  void EndLease(const std::string& id);
  // Moves expired channels out of the table (the caller drops them after unlocking).
  void TakeExpired(std::vector<std::shared_ptr<Channel>>& expired)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `owner` nullopt: any owner.
  absl::StatusOr<Entry*> Find(absl::string_view id, std::optional<absl::string_view> owner)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<ChannelLease> AcquireLease(absl::string_view id,
                                            std::optional<absl::string_view> owner);

  const ChannelRegistryOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> channels_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread reaper_;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_CHANNEL_REGISTRY_H_
