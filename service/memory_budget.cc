#include "service/memory_budget.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcompress {

MemoryReservation::MemoryReservation(MemoryReservation&& other) noexcept
    : budget_(std::exchange(other.budget_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

MemoryReservation& MemoryReservation::operator=(MemoryReservation&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = std::exchange(other.budget_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void MemoryReservation::Absorb(MemoryReservation&& other) {
  if (other.budget_ == nullptr) return;
  if (budget_ == nullptr) budget_ = other.budget_;
  bytes_ += std::exchange(other.bytes_, 0);
  other.budget_ = nullptr;
}

void MemoryReservation::Release() {
  if (budget_ != nullptr && bytes_ > 0) budget_->Return(bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<MemoryReservation> MemoryBudget::Reserve(uint64_t bytes) {
  uint64_t in_use = in_use_bytes_.load(std::memory_order_relaxed);
  while (true) {
    const bool fits =
        limit_bytes_ == 0 || (bytes <= limit_bytes_ && in_use <= limit_bytes_ - bytes);
    if (!fits) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "server memory budget exhausted: a tensor buffer needs ", bytes, " bytes while ", in_use,
          " of ", limit_bytes_, " bytes are in use (--max_buffered_bytes); retry later"));
    }
    if (in_use_bytes_.compare_exchange_weak(in_use, in_use + bytes, std::memory_order_relaxed)) {
      return MemoryReservation(this, bytes);
    }
  }
}

}  // namespace kvcompress
