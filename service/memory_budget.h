// Server-wide accounting of the host memory that request buffers hold (assembled tensors
// waiting for or being compressed), with admission control: a reservation past the limit
// fails with RESOURCE_EXHAUSTED instead of letting the process run out of memory.
//
// Thread safety: MemoryBudget is thread-safe. A MemoryReservation is a movable value owned
// by one thread at a time; it returns its bytes when destroyed. The budget must outlive
// every reservation taken from it.
#ifndef KVCOMPRESS_SERVICE_MEMORY_BUDGET_H_
#define KVCOMPRESS_SERVICE_MEMORY_BUDGET_H_

#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"

namespace kvcompress {

class MemoryBudget;

// Bytes held against a MemoryBudget; released on destruction or Release().
class MemoryReservation final {
 public:
  MemoryReservation() = default;
  MemoryReservation(MemoryReservation&& other) noexcept;
  MemoryReservation& operator=(MemoryReservation&& other) noexcept;
  MemoryReservation(const MemoryReservation&) = delete;
  MemoryReservation& operator=(const MemoryReservation&) = delete;
  ~MemoryReservation() { Release(); }

  uint64_t bytes() const { return bytes_; }

  // Takes over `other`'s bytes (both must come from the same budget, or one be empty).
  void Absorb(MemoryReservation&& other);

  // Returns the bytes to the budget now.
  void Release();

 private:
  friend class MemoryBudget;
  MemoryReservation(MemoryBudget* budget, uint64_t bytes) : budget_(budget), bytes_(bytes) {}

  MemoryBudget* budget_ = nullptr;
  uint64_t bytes_ = 0;
};

class MemoryBudget final {
 public:
  // `limit_bytes` 0 means unlimited (bytes are still counted).
  explicit MemoryBudget(uint64_t limit_bytes) : limit_bytes_(limit_bytes) {}
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Reserves `bytes`. RESOURCE_EXHAUSTED naming the request size, the bytes in use and the
  // limit when the reservation does not fit.
  absl::StatusOr<MemoryReservation> Reserve(uint64_t bytes);

  uint64_t in_use_bytes() const { return in_use_bytes_.load(std::memory_order_relaxed); }
  uint64_t limit_bytes() const { return limit_bytes_; }

 private:
  friend class MemoryReservation;
  void Return(uint64_t bytes) { in_use_bytes_.fetch_sub(bytes, std::memory_order_relaxed); }

  const uint64_t limit_bytes_;
  std::atomic<uint64_t> in_use_bytes_{0};
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_MEMORY_BUDGET_H_
