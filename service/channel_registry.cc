#include "service/channel_registry.h"

#include <openssl/rand.h>

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvcompress {
namespace {

// 128 random bits as 32 lowercase hex digits.
absl::StatusOr<std::string> NewChannelId() {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) {
    return absl::InternalError("could not draw a random channel id (RAND_bytes failed)");
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

}  // namespace

std::string ChannelOwnerFor(const CallIdentity& identity) {
  if (identity.certificate_verified) return absl::StrCat("cert:", identity.certificate_subject);
  if (identity.token_checked) return "token";
  return "anonymous";
}

Channel::Channel(std::string id, std::string transport, std::string owner,
                 absl::Duration idle_timeout, std::unique_ptr<ChannelResources> resources)
    : id_(std::move(id)),
      transport_(std::move(transport)),
      owner_(std::move(owner)),
      idle_timeout_(idle_timeout),
      resources_(std::move(resources)),
      resources_view_(resources_.get()) {}

Channel::~Channel() {
  absl::MutexLock lock(&mu_);
  if (resources_ != nullptr) resources_->Release();
}

absl::StatusOr<uint32_t> Channel::AddRegion(const RegionDescriptor& region, size_t max_regions) {
  if (region.size_bytes == 0) {
    return absl::InvalidArgumentError("region size_bytes: got 0, expected the region's size (> 0)");
  }
  absl::MutexLock lock(&mu_);
  if (regions_.size() >= max_regions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "channel ", id_, " already holds ", regions_.size(), " regions, the limit per channel"));
  }
  absl::StatusOr<std::byte*> base = resources_->OpenRegion(region);
  if (!base.ok()) return base.status();
  regions_.push_back(ChannelRegion{*base, region.size_bytes});
  return static_cast<uint32_t>(regions_.size() - 1);
}

absl::StatusOr<std::byte*> Channel::ResolveWritableSlice(uint32_t region, uint64_t offset,
                                                         uint64_t capacity,
                                                         absl::string_view field) const {
  if (capacity == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": bytes 0; an output slice needs room for the layer's result"));
  }
  absl::MutexLock lock(&mu_);
  if (region >= regions_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": region ", region,
                                                   " is not registered on channel ", id_,
                                                   " (it has ", regions_.size(), " regions)"));
  }
  if (offset % kRegionSliceAlignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": offset ", offset, " is not a multiple of ", kRegionSliceAlignment));
  }
  const ChannelRegion& target = regions_[region];
  if (offset > target.size_bytes || capacity > target.size_bytes - offset) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": bytes [", offset, ", ", offset, " + ",
                                                   capacity, ") lie outside region ", region, " (",
                                                   target.size_bytes, " bytes)"));
  }
  return target.base + offset;
}

absl::StatusOr<std::byte*> Channel::ResolveSlice(uint32_t region, uint64_t offset, uint64_t bytes,
                                                 uint64_t expected_bytes,
                                                 absl::string_view field) const {
  absl::MutexLock lock(&mu_);
  if (region >= regions_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": region ", region,
                                                   " is not registered on channel ", id_,
                                                   " (it has ", regions_.size(), " regions)"));
  }
  if (bytes != expected_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": expected ", expected_bytes, " bytes from the header's geometry, got ", bytes));
  }
  if (offset % kRegionSliceAlignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": offset ", offset, " is not a multiple of ", kRegionSliceAlignment));
  }
  const ChannelRegion& target = regions_[region];
  if (offset > target.size_bytes || bytes > target.size_bytes - offset) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": bytes [", offset, ", ", offset, " + ",
                                                   bytes, ") lie outside region ", region, " (",
                                                   target.size_bytes, " bytes)"));
  }
  return target.base + offset;
}

size_t Channel::num_regions() const {
  absl::MutexLock lock(&mu_);
  return regions_.size();
}

ChannelLease::ChannelLease(ChannelLease&& other) noexcept
    : registry_(std::exchange(other.registry_, nullptr)), channel_(std::move(other.channel_)) {}

ChannelLease& ChannelLease::operator=(ChannelLease&& other) noexcept {
  if (this != &other) {
    Reset();
    registry_ = std::exchange(other.registry_, nullptr);
    channel_ = std::move(other.channel_);
  }
  return *this;
}

void ChannelLease::Reset() {
  if (channel_ == nullptr) return;
  if (registry_ != nullptr) registry_->EndLease(channel_->id());
  registry_ = nullptr;
  channel_.reset();  // may release the channel's resources when it was closed meanwhile
}

ChannelRegistry::ChannelRegistry(ChannelRegistryOptions options) : options_(std::move(options)) {}

ChannelRegistry::~ChannelRegistry() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (reaper_.joinable()) reaper_.join();
  absl::flat_hash_map<std::string, Entry> channels;
  {
    absl::MutexLock lock(&mu_);
    channels.swap(channels_);
  }
}

absl::StatusOr<std::shared_ptr<Channel>> ChannelRegistry::Open(
    std::string transport, std::string owner, absl::Duration requested_idle_timeout,
    std::unique_ptr<ChannelResources> resources) {
  const absl::Duration idle_timeout = requested_idle_timeout <= absl::ZeroDuration() ||
                                              requested_idle_timeout > options_.idle_timeout
                                          ? options_.idle_timeout
                                          : requested_idle_timeout;
  absl::StatusOr<std::string> id = NewChannelId();
  if (!id.ok()) {
    if (resources != nullptr) resources->Release();
    return id.status();
  }
  auto channel = std::make_shared<Channel>(*id, std::move(transport), std::move(owner),
                                           idle_timeout, std::move(resources));
  std::vector<std::shared_ptr<Channel>> expired;
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    TakeExpired(expired);
    if (channels_.size() >= options_.max_channels) {
      refused = absl::ResourceExhaustedError(absl::StrCat(
          "kvcd holds ", channels_.size(), " open channels, the limit (--max_channels ",
          options_.max_channels, "); close channels no longer needed"));
    } else {
      channels_.emplace(channel->id(), Entry{channel, 0, Now()});
    }
  }
  if (!refused.ok()) return refused;  // `channel` releases its resources on the way out
  return channel;
}

void ChannelRegistry::TakeExpired(std::vector<std::shared_ptr<Channel>>& expired) {
  const absl::Time now = Now();
  for (auto it = channels_.begin(); it != channels_.end();) {
    const Entry& entry = it->second;
    if (entry.leases == 0 && now - entry.last_used >= entry.channel->idle_timeout()) {
      expired.push_back(entry.channel);
      channels_.erase(it++);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<ChannelRegistry::Entry*> ChannelRegistry::Find(
    absl::string_view id, std::optional<absl::string_view> owner) {
  auto it = channels_.find(id);
  if (it == channels_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("channel ", id.substr(0, 64),
                     " is not open on this kvcd (never opened, closed, or expired after its idle "
                     "timeout); open a new one with OpenChannel"));
  }
  if (owner.has_value() && it->second.channel->owner() != *owner) {
    return absl::PermissionDeniedError(
        absl::StrCat("channel ", id,
                     " belongs to another client; a channel is usable only by "
                     "the principal that opened it"));
  }
  return &it->second;
}

absl::StatusOr<ChannelLease> ChannelRegistry::Acquire(absl::string_view id,
                                                      absl::string_view owner) {
  return AcquireLease(id, owner);
}

absl::StatusOr<ChannelLease> ChannelRegistry::AcquireById(absl::string_view id) {
  return AcquireLease(id, std::nullopt);
}

absl::StatusOr<ChannelLease> ChannelRegistry::AcquireLease(absl::string_view id,
                                                           std::optional<absl::string_view> owner) {
  std::vector<std::shared_ptr<Channel>> expired;
  absl::StatusOr<ChannelLease> lease;
  {
    absl::MutexLock lock(&mu_);
    TakeExpired(expired);
    absl::StatusOr<Entry*> entry = Find(id, owner);
    if (entry.ok()) {
      ++(*entry)->leases;
      (*entry)->last_used = Now();
      lease = ChannelLease(this, (*entry)->channel);
    } else {
      lease = entry.status();
    }
  }
  return lease;
}

void ChannelRegistry::EndLease(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = channels_.find(id);
  if (it == channels_.end()) return;  // closed meanwhile
  --it->second.leases;
  it->second.last_used = Now();
}

absl::Status ChannelRegistry::Close(absl::string_view id, absl::string_view owner) {
  // Channels leave the table under the lock and are released after it (unless a lease still
  // holds one).
  std::vector<std::shared_ptr<Channel>> removed;
  absl::MutexLock lock(&mu_);
  TakeExpired(removed);
  absl::StatusOr<Entry*> entry = Find(id, owner);
  if (!entry.ok()) return entry.status();
  removed.push_back((*entry)->channel);
  channels_.erase(channels_.find(id));
  return absl::OkStatus();
}

int ChannelRegistry::ExpireIdle() {
  std::vector<std::shared_ptr<Channel>> expired;
  {
    absl::MutexLock lock(&mu_);
    TakeExpired(expired);
  }
  return static_cast<int>(expired.size());
}

void ChannelRegistry::StartReaper(absl::Duration interval) {
  if (reaper_.joinable()) return;
  reaper_ = std::thread([this, interval] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(&stopping_), interval);
        if (stopping_) return;
      }
      ExpireIdle();
    }
  });
}

size_t ChannelRegistry::OpenChannels(absl::string_view transport) const {
  absl::MutexLock lock(&mu_);
  if (transport.empty()) return channels_.size();
  return static_cast<size_t>(std::count_if(
      channels_.begin(), channels_.end(),
      [transport](const auto& item) { return item.second.channel->transport() == transport; }));
}

}  // namespace kvcompress
