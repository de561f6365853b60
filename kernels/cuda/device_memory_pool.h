// DeviceMemoryPool: stream-ordered device memory with a byte budget.
//
// Backed by a CUDA memory pool of its own (cudaMallocFromPoolAsync / cudaFreeAsync) that keeps
// freed memory cached for reuse, so steady-state batches allocate nothing from the driver.
// Allocate fails with RESOURCE_EXHAUSTED when the bytes held would exceed the budget — the
// admission control DESIGN §7 asks for — instead of failing inside a kernel launch.
//
// DeviceBuffer is the move-only owner of one allocation; destroying it frees the memory in
// the order of its stream (work already enqueued on that stream may still use it).
//
// Thread safety: DeviceMemoryPool is thread-safe. A DeviceBuffer is not shared between threads.
#ifndef KVCOMPRESS_KERNELS_CUDA_DEVICE_MEMORY_POOL_H_
#define KVCOMPRESS_KERNELS_CUDA_DEVICE_MEMORY_POOL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace kvcompress::cuda {

class DeviceMemoryPool;

class DeviceBuffer final {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  cudaStream_t stream() const { return stream_; }
  // Frees now (stream-ordered); the buffer becomes empty.
  void Reset();

 private:
  friend class DeviceMemoryPool;
  DeviceBuffer(DeviceMemoryPool* pool, std::byte* data, size_t size, cudaStream_t stream)
      : pool_(pool), data_(data), size_(size), stream_(stream) {}

  DeviceMemoryPool* pool_ = nullptr;
  std::byte* data_ = nullptr;
  size_t size_ = 0;
  cudaStream_t stream_ = nullptr;
};

class DeviceMemoryPool final {
 public:
  // A pool on `device` that holds at most `budget_bytes` at once. INTERNAL when the device has
  // no memory-pool support or a runtime call fails.
  static absl::StatusOr<std::unique_ptr<DeviceMemoryPool>> Create(int device, size_t budget_bytes);

  DeviceMemoryPool(const DeviceMemoryPool&) = delete;
  DeviceMemoryPool& operator=(const DeviceMemoryPool&) = delete;
  ~DeviceMemoryPool();

  // `bytes` (rounded up to 256) usable by work on `stream` from the moment of the call in
  // stream order. RESOURCE_EXHAUSTED naming the request, the bytes held and the budget when it
  // does not fit; INTERNAL on runtime errors. The pool must outlive the buffer.
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, cudaStream_t stream);

  size_t budget_bytes() const { return budget_bytes_; }
  size_t bytes_in_use() const;
  int device() const { return device_; }

 private:
  friend class DeviceBuffer;
  DeviceMemoryPool(int device, size_t budget_bytes, cudaMemPool_t pool)
      : device_(device), budget_bytes_(budget_bytes), pool_(pool) {}
  void Free(std::byte* data, size_t size, cudaStream_t stream);

  const int device_;
  const size_t budget_bytes_;
  cudaMemPool_t pool_;
  mutable absl::Mutex mu_;
  size_t bytes_in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcompress::cuda

#endif  // KVCOMPRESS_KERNELS_CUDA_DEVICE_MEMORY_POOL_H_
