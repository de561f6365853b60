// The CUDA backend: the Backend of kernels/backend.h running on one NVIDIA GPU.
//
// MakeCudaBackend copies each batch of host layer views into pooled device memory, runs the
// whole batch (all layers, heads and sequences of the call) as one launch sequence on a
// stream of its own, and copies the results back through pinned staging buffers. It keeps the
// kept sets of the CPU reference backend (kernels/cpu): byte-identical rows, identical
// positions, except where two tokens' scores are a genuine near-tie at the selection boundary
// (the CPU scores in fp64, the GPU in fp32). Device-resident caches (CUDA IPC, NCCL) go through
// kernels/cuda/cuda_compressor.h instead, which takes device pointers.
//
// Implemented stages: every scorer — snapkv (avg/max pooling, any odd kernel size, mean/max/sum
// group reduction), knorm, streaming, keydiff, observed (client scores, per KV head or
// group-reduced) and tova (the last window query's softmax from the first attention pass);
// protect_sinks / protect_recent; uniform and adaptive head budgets (AdaKV, truly ragged heads);
// the drop reducer and the merging reducers merge_similar and merge_nearest (their rows
// computed in the CPU reference's fp64 order; merged counts in LayerResult::merged);
// attention_mass_kept. A head_dim other than 64, 128 and 256 answers UNIMPLEMENTED naming the
// stage; kvcd routes such requests to the CPU reference (Backend::Supports,
// service/backend_router.h).
//
// This header compiles without CUDA. In a build without CUDA, MakeCudaBackend answers
// UNIMPLEMENTED; in a build with CUDA on a machine without a device, FAILED_PRECONDITION.
//
// Thread safety: the backend is thread-safe; concurrent calls run on separate streams.
#ifndef KVCOMPRESS_KERNELS_CUDA_BACKEND_H_
#define KVCOMPRESS_KERNELS_CUDA_BACKEND_H_

#include <cstddef>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/method_spec.h"

namespace kvcompress {

class CudaCompressor;  // kernels/cuda/cuda_compressor.h (needs the CUDA headers)

struct CudaBackendOptions {
  // CUDA device ordinal. Default 0.
  int device = 0;
  // Device memory the backend may hold at once (inputs, scratch and results of the calls in
  // flight). A call that would exceed it fails with RESOURCE_EXHAUSTED. 0 (the default): 90% of
  // the device memory free when the backend is made.
  size_t memory_budget_bytes = 0;
  // Size of each pinned host staging buffer; each call in flight uses two. Default 32 MiB.
  size_t staging_buffer_bytes = size_t{32} << 20;
};

// Whether this build contains the CUDA backend (false: MakeCudaBackend is a stub).
bool CudaBackendCompiled();

// The CUDA backend on options.device. FAILED_PRECONDITION when no CUDA device is present (or
// the ordinal is out of range), UNIMPLEMENTED when the build has no CUDA, INTERNAL on other
// device errors.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options);

// The device-level compressor of `backend` when it is a CUDA backend made by MakeCudaBackend,
// else null (always null in a build without CUDA). GPU transports run device-resident layers
// through it (CudaCompressor::Compress) instead of making a second compressor; it lives as
// long as the backend.
CudaCompressor* CudaCompressorOf(Backend& backend);

// OK when the CUDA backend can run `spec` on head_dim `head_dim`; UNIMPLEMENTED naming the
// first stage it cannot run (e.g. "head_dim 96"). Layer budgets are the pipeline's business and are
// not checked here.
absl::Status CheckCudaMethodSupported(const MethodSpec& spec, int head_dim);

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_CUDA_BACKEND_H_
