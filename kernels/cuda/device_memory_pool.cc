#include "kernels/cuda/device_memory_pool.h"

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"

namespace kvcompress::cuda {

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      stream_(std::exchange(other.stream_, nullptr)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    pool_ = std::exchange(other.pool_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { Reset(); }

void DeviceBuffer::Reset() {
  if (pool_ != nullptr && data_ != nullptr) pool_->Free(data_, size_, stream_);
  pool_ = nullptr;
  data_ = nullptr;
  size_ = 0;
}

absl::StatusOr<std::unique_ptr<DeviceMemoryPool>> DeviceMemoryPool::Create(int device,
                                                                           size_t budget_bytes) {
  int supported = 0;
  KVC_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device));
  if (!supported) {
    return absl::InternalError(absl::StrCat("device ", device,
                                            " does not support stream-ordered memory pools"));
  }
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  KVC_CUDA_RETURN_IF_ERROR(cudaMemPoolCreate(&pool, &props));
  // Keep freed memory cached (up to the budget) instead of returning it at every sync.
  uint64_t threshold = budget_bytes;
  if (const cudaError_t error =
          cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
      error != cudaSuccess) {
    cudaMemPoolDestroy(pool);
    KVC_CUDA_RETURN_IF_ERROR(error);
  }
  return std::unique_ptr<DeviceMemoryPool>(new DeviceMemoryPool(device, budget_bytes, pool));
}

DeviceMemoryPool::~DeviceMemoryPool() {
  cudaSetDevice(device_);
  cudaDeviceSynchronize();
  cudaMemPoolDestroy(pool_);
}

absl::StatusOr<DeviceBuffer> DeviceMemoryPool::Allocate(size_t bytes, cudaStream_t stream) {
  const size_t rounded = (bytes + 255) / 256 * 256;
  if (rounded == 0) return DeviceBuffer();
  {
    absl::MutexLock lock(&mu_);
    if (rounded > budget_bytes_ || bytes_in_use_ > budget_bytes_ - rounded) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "device memory budget: a request for ", rounded, " bytes does not fit; ",
          bytes_in_use_, " of the budget's ", budget_bytes_,
          " bytes are in use (raise the device memory budget or send smaller batches)"));
    }
    bytes_in_use_ += rounded;
  }
  void* data = nullptr;
  if (const cudaError_t error = cudaMallocFromPoolAsync(&data, rounded, pool_, stream);
      error != cudaSuccess) {
    absl::MutexLock lock(&mu_);
    bytes_in_use_ -= rounded;
    if (error == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      return absl::ResourceExhaustedError(absl::StrCat(
          "device memory: the device could not allocate ", rounded, " bytes (", bytes_in_use_,
          " bytes held by this pool)"));
    }
    KVC_CUDA_RETURN_IF_ERROR(error);
  }
  return DeviceBuffer(this, static_cast<std::byte*>(data), rounded, stream);
}

size_t DeviceMemoryPool::bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return bytes_in_use_;
}

void DeviceMemoryPool::Free(std::byte* data, size_t size, cudaStream_t stream) {
  cudaFreeAsync(data, stream);
  absl::MutexLock lock(&mu_);
  bytes_in_use_ -= size;
}

}  // namespace kvcompress::cuda
