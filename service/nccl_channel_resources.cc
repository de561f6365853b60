// The CUDA-free parts of the nccl transport (nccl_transport.h): the channel resources around
// an NcclLink and the forward notices.
#include <algorithm>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "service/nccl_transport.h"

namespace kvcompress {
namespace {

class NcclChannelResources final : public ChannelResources {
 public:
  explicit NcclChannelResources(std::unique_ptr<NcclLink> link) : link_(std::move(link)) {
    if (link_->direction() == ChannelDirection::kFromKvcd) {
      outbox_ = std::make_unique<ForwardOutbox>(*link_);
    }
  }

  absl::StatusOr<std::byte*> OpenRegion(const RegionDescriptor&) override {
    return absl::FailedPreconditionError(
        "nccl channels have no regions: the tensors travel over the channel's communicator "
        "(RegisterRegion is for cuda_ipc channels)");
  }

  void Release() override { link_->Abort("the channel was closed"); }

  NcclLink* nccl_link() override { return link_.get(); }
  ForwardOutbox* forward_outbox() override { return outbox_.get(); }

 private:
  std::unique_ptr<NcclLink> link_;
  std::unique_ptr<ForwardOutbox> outbox_;  // FROM_KVCD only
};

}  // namespace

std::unique_ptr<ChannelResources> MakeNcclChannelResources(std::unique_ptr<NcclLink> link) {
  return std::make_unique<NcclChannelResources>(std::move(link));
}

v1::ForwardNotice ForwardNoticeFor(const LayerResult& result, size_t row_bytes,
                                   const ForwardContext& forward) {
  v1::ForwardNotice notice;
  v1::ForwardedLayer& layer = *notice.mutable_layer();
  layer.set_request_id(forward.request_id);
  if (forward.geometry != nullptr) *layer.mutable_geometry() = *forward.geometry;
  if (forward.sequence_shapes != nullptr) {
    *layer.mutable_sequence_shape() =
        forward.sequence_shapes->at(static_cast<size_t>(result.sequence));
    layer.set_num_sequences(static_cast<uint32_t>(forward.sequence_shapes->size()));
  }
  v1::LayerResult& out = *layer.mutable_result();
  out.set_sequence(static_cast<uint32_t>(result.sequence));
  out.set_layer(static_cast<uint32_t>(result.layer));
  out.set_format(v1::OUTPUT_FORMAT_RAGGED);
  int64_t rows = 0;
  int32_t max_kept = 0;
  for (int32_t kept : result.kept) {
    out.add_kept(static_cast<uint32_t>(kept));
    rows += kept;
    max_kept = std::max(max_kept, kept);
  }
  out.set_max_kept(static_cast<uint32_t>(max_kept));
  out.set_keys_bytes(static_cast<uint64_t>(rows) * row_bytes);
  out.set_values_bytes(static_cast<uint64_t>(rows) * row_bytes);
  out.set_positions_bytes(static_cast<uint64_t>(rows) * sizeof(int32_t));
  out.set_merged_bytes(result.merged.empty() ? 0 : static_cast<uint64_t>(rows) * sizeof(int32_t));
  out.set_attention_mass_kept(result.attention_mass_kept);
  return notice;
}

}  // namespace kvcompress
