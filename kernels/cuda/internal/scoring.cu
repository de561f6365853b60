// Per-token scorers that follow the attention passes or stand alone: SnapKV pooling and group
// reduction of the column sums, the key norm, and StreamingLLM's positional scores. Each
// applies protect_sinks / protect_recent (+inf) and writes [H_kv, T] fp32 scores.
#include <cmath>

#include "kernels/cuda/internal/device_utils.cuh"
#include "kernels/cuda/internal/kernel_params.h"
#include "kernels/snapkv_window.h"

namespace kvcompress::cuda {
namespace {

__device__ __forceinline__ bool IsProtected(const Protection& protection, int64_t token,
                                            int64_t num_tokens) {
  return token < protection.sinks || token >= num_tokens - protection.recent;
}

constexpr int kFinalizeTokens = 256;
constexpr int kMaxPoolHalf = 511;  // kernel sizes up to 1023

// score_j = reduce_g pool_k(mean_i A_gij) over prefix keys, fp64 from the fp32 column sums, in
// the CPU reference's order of operations; window tokens +inf. A block scores 256 tokens:
// member by member it stages the means its pooling windows need in shared memory.
__global__ void __launch_bounds__(kFinalizeTokens)
    SnapKvFinalizeKernel(const SnapKvFinalizeParams params) {
  __shared__ double means[kFinalizeTokens + 2 * kMaxPoolHalf];
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * kFinalizeTokens;
  if (first_token >= num_tokens) return;
  const int64_t token = first_token + threadIdx.x;
  const int64_t prefix = job.prefix;
  const int half = params.kernel_size / 2;
  const int64_t base = first_token - half;  // means[t - base] holds mean(t)
  const int64_t stage_first = base > 0 ? base : 0;
  const int64_t stage_end = min(first_token + kFinalizeTokens + half, prefix);
  const int group_size = params.shape.group_size;
  const int blocks_per_member = job.qblocks_per_member;
  const float* head_sums =
      params.colsum + job.colsum_offset +
      static_cast<int64_t>(job_head.head) * group_size * blocks_per_member * num_tokens;
  const bool max_reduction = params.group_reduction == GroupReduction::kMax;
  // Reciprocals instead of fp64 divisions (a software sequence on the GPU); the scores move
  // by an ulp of fp64 at most, far below what the selection can see.
  const double inv_window = 1.0 / job.window;
  const double inv_kernel = 1.0 / params.kernel_size;
  double reduced = max_reduction ? -INFINITY : 0.0;
  if (stage_first < stage_end) {
    for (int member = 0; member < group_size; ++member) {
      __syncthreads();  // the previous member's means are read
      for (int64_t t = stage_first + threadIdx.x; t < stage_end; t += blockDim.x) {
        double sum = 0.0;
        for (int block = 0; block < blocks_per_member; ++block) {
          sum += head_sums[(static_cast<int64_t>(member) * blocks_per_member + block) * num_tokens +
                           t];
        }
        means[t - base] = sum * inv_window;
      }
      __syncthreads();
      if (token < prefix) {
        const PoolingWindow pool = PoolingWindowAt(token, params.kernel_size, prefix);
        double pooled = params.pooling == Pooling::kAvg ? 0.0 : -INFINITY;
        for (int64_t t = pool.first; t <= pool.last; ++t) {
          const double mean = means[t - base];
          pooled = params.pooling == Pooling::kAvg ? pooled + mean : fmax(pooled, mean);
        }
        if (params.pooling == Pooling::kAvg) pooled *= inv_kernel;
        reduced = max_reduction ? fmax(reduced, pooled) : reduced + pooled;
      }
    }
  }
  if (token >= num_tokens) return;
  float score = INFINITY;
  if (token < prefix) {
    const double divisor = params.group_reduction == GroupReduction::kMean ? group_size : 1.0;
    score = static_cast<float>(reduced / divisor);
  }
  if (IsProtected(params.protection, token, num_tokens)) score = INFINITY;
  params.scores[job.score_offset + static_cast<int64_t>(job_head.head) * num_tokens + token] =
      score;
}

// −‖k_j‖₂ with the squares summed in fp64 in element order, exactly as the CPU reference sums
// them (each square of a float is exact in fp64, so FMA contraction changes nothing): the
// scores are bit-identical. Rows are staged through shared memory (coalesced loads, padded to
// avoid bank conflicts) so that each thread can walk its own row in order.
// Key rows of one (job, head) staged in shared memory, one row per thread: coalesced loads,
// rows padded to avoid bank conflicts, so that each thread can walk its own row in order.
template <DType kDType, int kHeadDim>
struct StagedKeyRows {
  using Traits = ElementTraits<kDType>;
  static constexpr int kRowBytes = kHeadDim * Traits::kSize;
  static constexpr int kTokens = kRowBytes <= 256 ? 128 : (kRowBytes <= 512 ? 64 : 32);
  static constexpr int kWords = kRowBytes / 4;
  static constexpr int kStride = kWords + 1;
  static constexpr int kChunks = kRowBytes / 16;

  uint32_t words[kTokens * kStride];

  // Loads rows [first, first + kTokens) ∩ [0, T) of `head`; ends synced.
  __device__ void Load(const DeviceJob& job, const BatchShape& shape, int head, int64_t first) {
    for (int index = threadIdx.x; index < kTokens * kChunks; index += blockDim.x) {
      const int row = index / kChunks;
      const int chunk = index % kChunks;
      const int64_t token = first + row;
      if (token < job.num_tokens) {
        const uint4 value = __ldg(
            reinterpret_cast<const uint4*>(job.keys +
                                           RowElementOffset(shape.layout, shape.num_kv_heads,
                                                            job.num_tokens, kHeadDim, head, token) *
                                               Traits::kSize +
                                           chunk * 16));
        uint32_t* out = words + row * kStride + chunk * 4;
        out[0] = value.x;
        out[1] = value.y;
        out[2] = value.z;
        out[3] = value.w;
      }
    }
    __syncthreads();
  }

  // Element d of row `row`, exactly as a float.
  __device__ float At(int row, int d) const {
    if constexpr (Traits::kIsFloat32) {
      return __uint_as_float(words[row * kStride + d]);
    } else {
      const uint32_t bits = words[row * kStride + d / 2];
      const uint16_t half = static_cast<uint16_t>((d & 1) ? bits >> 16 : bits & 0xffffu);
      return Traits::kIsBFloat16 ? BFloat16ToFloat(half) : Float16ToFloat(half);
    }
  }

  // Σ_d x_d² in fp64 in element order (each square of a float is exact in fp64, so the sum
  // is the CPU reference's bit for bit).
  __device__ double SquaredNorm(int row) const {
    double squares = 0.0;
#pragma unroll 8
    for (int d = 0; d < kHeadDim; ++d) {
      const double x = At(row, d);
      squares += x * x;
    }
    return squares;
  }
};

// −‖k_j‖₂ with the squares summed in fp64 in element order, exactly as the CPU reference sums
// them: the scores are bit-identical.
template <DType kDType, int kHeadDim>
__global__ void KnormKernel(const KnormParams params) {
  using Rows = StagedKeyRows<kDType, kHeadDim>;
  __shared__ Rows rows;
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * Rows::kTokens;
  if (first >= num_tokens) return;
  rows.Load(job, params.shape, job_head.head, first);
  const int64_t token = first + threadIdx.x;
  if (token >= num_tokens) return;
  float score = static_cast<float>(-sqrt(rows.SquaredNorm(threadIdx.x)));
  if (IsProtected(params.protection, token, num_tokens)) score = INFINITY;
  params.scores[job.score_offset + static_cast<int64_t>(job_head.head) * num_tokens + token] =
      score;
}

// TOVA, first step: for each key j, Σ_g softmax_g(j) of the last sent query of each group
// member, in fp64. The softmax statistics are the first attention pass's (the last window row
// sees every key); the logits are recomputed here in fp32 from the same inputs.
template <DType kDType, int kHeadDim>
__global__ void TovaGroupSumsKernel(const TovaParams params) {
  using Rows = StagedKeyRows<kDType, kHeadDim>;
  using Traits = ElementTraits<kDType>;
  constexpr int kMembersPerRound = 8;  // query rows staged at once (shared memory)
  __shared__ Rows rows;
  __shared__ float queries[kMembersPerRound][kHeadDim];
  __shared__ RowStats row_stats[kMembersPerRound];
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * Rows::kTokens;
  if (first >= num_tokens) return;
  const int group_size = params.shape.group_size;
  rows.Load(job, params.shape, job_head.head, first);
  const int64_t token = first + threadIdx.x;
  const bool valid = token < num_tokens;
  double sum = 0.0;
  for (int first_member = 0; first_member < group_size; first_member += kMembersPerRound) {
    const int members = min(kMembersPerRound, group_size - first_member);
    __syncthreads();  // the previous round's queries are read
    for (int index = threadIdx.x; index < members * kHeadDim; index += blockDim.x) {
      const int member = index / kHeadDim;
      const int d = index % kHeadDim;
      const int64_t query_head =
          static_cast<int64_t>(job_head.head) * group_size + first_member + member;
      const std::byte* row =
          job.queries + (query_head * job.num_sent + (job.num_sent - 1)) * kHeadDim * Traits::kSize;
      if constexpr (Traits::kIsFloat32) {
        queries[member][d] = reinterpret_cast<const float*>(row)[d];
      } else {
        const uint16_t bits = reinterpret_cast<const uint16_t*>(row)[d];
        queries[member][d] = Traits::kIsBFloat16 ? BFloat16ToFloat(bits) : Float16ToFloat(bits);
      }
    }
    if (static_cast<int>(threadIdx.x) < members) {
      // Row g·window + (window − 1) of this head: the last window query of member g.
      const int64_t row =
          (static_cast<int64_t>(job_head.head) * group_size + first_member + threadIdx.x) *
              job.window +
          job.window - 1;
      row_stats[threadIdx.x] = params.stats[job.stats_offset + row];
    }
    __syncthreads();
    if (!valid) continue;
    for (int member = 0; member < members; ++member) {
      float dot = 0.0f;
      for (int d = 0; d < kHeadDim; ++d) {
        dot = fmaf(queries[member][d], rows.At(threadIdx.x, d), dot);
      }
      const RowStats stats = row_stats[member];
      sum += static_cast<double>(exp2f(dot * params.scale_log2 - stats.max_x)) * stats.inv_sum;
    }
  }
  if (!valid) return;
  params.group_sums[job.tova_offset + static_cast<int64_t>(job_head.head) * num_tokens + token] =
      sum;
}

// TOVA, second step: score_j = Σ_h group_sums[h, j] / H_q for j < T − 1, +inf for the last
// token; one row repeated for every head.
__global__ void TovaCombineKernel(const TovaParams params) {
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= num_tokens) return;
  const int num_heads = params.shape.num_kv_heads;
  float score = INFINITY;
  if (token + 1 < num_tokens) {
    double total = 0.0;
    for (int h = 0; h < num_heads; ++h) {
      total += params.group_sums[job.tova_offset + static_cast<int64_t>(h) * num_tokens + token];
    }
    score = static_cast<float>(total / (num_heads * params.shape.group_size));
  }
  if (IsProtected(params.protection, token, num_tokens)) score = INFINITY;
  for (int h = 0; h < num_heads; ++h) {
    params.scores[job.score_offset + static_cast<int64_t>(h) * num_tokens + token] = score;
  }
}

// The thresholds torch's F.normalize and F.cosine_similarity clamp norms to (as the CPU).
constexpr double kNormalizeEps = 1e-12;
constexpr double kCosineEps = 1e-8;

// KeyDiff, first pass: anchor_sums[job_head, d] += Σ_j k_jd / max(‖k_j‖, 1e-12) in fp64.
// Blocks add their partial sums atomically, so the order of the sum differs from the CPU's;
// the anchor moves by ~1e-16 relative, far below what an fp32 score can show.
template <DType kDType, int kHeadDim>
__global__ void KeyDiffAnchorKernel(const KeyDiffParams params) {
  using Rows = StagedKeyRows<kDType, kHeadDim>;
  __shared__ Rows rows;
  __shared__ double inverse_norms[Rows::kTokens];
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * Rows::kTokens;
  if (first >= job.num_tokens) return;
  rows.Load(job, params.shape, job_head.head, first);
  const int64_t remaining = job.num_tokens - first;
  const int valid = remaining < Rows::kTokens ? static_cast<int>(remaining) : Rows::kTokens;
  if (static_cast<int>(threadIdx.x) < valid) {
    inverse_norms[threadIdx.x] = 1.0 / fmax(sqrt(rows.SquaredNorm(threadIdx.x)), kNormalizeEps);
  }
  __syncthreads();
  double* anchor_sums = params.anchor_sums + static_cast<int64_t>(blockIdx.y) * kHeadDim;
  for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
    double sum = 0.0;
    for (int row = 0; row < valid; ++row) {
      sum = __dadd_rn(sum, __dmul_rn(rows.At(row, d), inverse_norms[row]));
    }
    atomicAdd(&anchor_sums[d], sum);
  }
}

// KeyDiff, second pass: score_j = −(k_j·a) / (max(‖k_j‖, 1e-8)·max(‖a‖, 1e-8)), a = sums / T,
// in fp64 with the CPU's order of operations (no FMA contraction).
template <DType kDType, int kHeadDim>
__global__ void KeyDiffScoreKernel(const KeyDiffParams params) {
  using Rows = StagedKeyRows<kDType, kHeadDim>;
  __shared__ Rows rows;
  __shared__ double anchor[kHeadDim];
  __shared__ double anchor_norm;
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * Rows::kTokens;
  if (first >= num_tokens) return;
  const double* anchor_sums = params.anchor_sums + static_cast<int64_t>(blockIdx.y) * kHeadDim;
  for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
    anchor[d] = anchor_sums[d] / static_cast<double>(num_tokens);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double squares = 0.0;
    for (int d = 0; d < kHeadDim; ++d)
      squares = __dadd_rn(squares, __dmul_rn(anchor[d], anchor[d]));
    anchor_norm = fmax(sqrt(squares), kCosineEps);
  }
  rows.Load(job, params.shape, job_head.head, first);
  const int64_t token = first + threadIdx.x;
  if (token >= num_tokens) return;
  double dot = 0.0;
  for (int d = 0; d < kHeadDim; ++d)
    dot = __dadd_rn(dot, __dmul_rn(rows.At(threadIdx.x, d), anchor[d]));
  const double norm = fmax(sqrt(rows.SquaredNorm(threadIdx.x)), kCosineEps);
  float score = static_cast<float>(-dot / __dmul_rn(norm, anchor_norm));
  if (IsProtected(params.protection, token, num_tokens)) score = INFINITY;
  params.scores[job.score_offset + static_cast<int64_t>(job_head.head) * num_tokens + token] =
      score;
}

// The CPU reference's reduction of the client's scores (fp64, members in order, NaN in any
// member makes the token NaN), rounded once to fp32.
__global__ void ObservedScoresKernel(const ObservedScoreParams params) {
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= num_tokens) return;
  const bool per_query_head = job.num_score_heads != params.shape.num_kv_heads;
  const int members = per_query_head ? params.shape.group_size : 1;
  const float* rows =
      job.client_scores + static_cast<int64_t>(job_head.head) * members * num_tokens + token;
  const bool max_reduction = params.group_reduction == GroupReduction::kMax;
  double reduced = max_reduction ? -INFINITY : 0.0;
  bool any_nan = false;
  for (int member = 0; member < members; ++member) {
    const double value = rows[static_cast<int64_t>(member) * num_tokens];
    any_nan = any_nan || isnan(value);
    if (max_reduction) {
      reduced = value > reduced ? value : reduced;
    } else {
      reduced += value;
    }
  }
  if (params.group_reduction == GroupReduction::kMean) reduced /= members;
  float score = any_nan ? NAN : static_cast<float>(reduced);
  if (IsProtected(params.protection, token, num_tokens)) score = INFINITY;
  params.scores[job.score_offset + static_cast<int64_t>(job_head.head) * num_tokens + token] =
      score;
}

__global__ void StreamingScoresKernel(const StreamingScoreParams params) {
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int64_t num_tokens = job.num_tokens;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= num_tokens) return;
  float score = token < params.sinks ? INFINITY : static_cast<float>(token);
  if (IsProtected(params.protection, token, num_tokens)) score = INFINITY;
  params.scores[job.score_offset + static_cast<int64_t>(job_head.head) * num_tokens + token] =
      score;
}

constexpr int kScoreThreads = 256;

dim3 TokenGrid(int64_t max_tokens, int threads, int num_job_heads) {
  return dim3(static_cast<unsigned>((max_tokens + threads - 1) / threads),
              static_cast<unsigned>(num_job_heads));
}

}  // namespace

cudaError_t LaunchSnapKvFinalize(const SnapKvFinalizeParams& params, int num_job_heads,
                                 int64_t max_tokens, cudaStream_t stream) {
  if (num_job_heads == 0) return cudaSuccess;
  SnapKvFinalizeKernel<<<TokenGrid(max_tokens, kFinalizeTokens, num_job_heads), kFinalizeTokens, 0,
                         stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchTovaCombine(const TovaParams& params, int num_jobs, int64_t max_tokens,
                              cudaStream_t stream) {
  if (num_jobs == 0) return cudaSuccess;
  TovaCombineKernel<<<TokenGrid(max_tokens, kScoreThreads, num_jobs), kScoreThreads, 0, stream>>>(
      params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim>
cudaError_t LaunchTovaGroupSums(const TovaParams& params, int num_job_heads, int64_t max_tokens,
                                cudaStream_t stream) {
  if (num_job_heads == 0) return cudaSuccess;
  constexpr int kTokens = StagedKeyRows<kDType, kHeadDim>::kTokens;
  TovaGroupSumsKernel<kDType, kHeadDim>
      <<<TokenGrid(max_tokens, kTokens, num_job_heads), kTokens, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchObservedScores(const ObservedScoreParams& params, int num_job_heads,
                                 int64_t max_tokens, cudaStream_t stream) {
  if (num_job_heads == 0) return cudaSuccess;
  ObservedScoresKernel<<<TokenGrid(max_tokens, kScoreThreads, num_job_heads), kScoreThreads, 0,
                         stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchStreamingScores(const StreamingScoreParams& params, int num_job_heads,
                                  int64_t max_tokens, cudaStream_t stream) {
  if (num_job_heads == 0) return cudaSuccess;
  StreamingScoresKernel<<<TokenGrid(max_tokens, kScoreThreads, num_job_heads), kScoreThreads, 0,
                          stream>>>(params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim>
cudaError_t LaunchKnormScores(const KnormParams& params, int num_job_heads, int64_t max_tokens,
                              cudaStream_t stream) {
  if (num_job_heads == 0) return cudaSuccess;
  constexpr int kTokens = StagedKeyRows<kDType, kHeadDim>::kTokens;
  KnormKernel<kDType, kHeadDim>
      <<<TokenGrid(max_tokens, kTokens, num_job_heads), kTokens, 0, stream>>>(params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim>
cudaError_t LaunchKeyDiffScores(const KeyDiffParams& params, int num_job_heads, int64_t max_tokens,
                                cudaStream_t stream) {
  if (num_job_heads == 0) return cudaSuccess;
  constexpr int kTokens = StagedKeyRows<kDType, kHeadDim>::kTokens;
  const dim3 grid = TokenGrid(max_tokens, kTokens, num_job_heads);
  KeyDiffAnchorKernel<kDType, kHeadDim><<<grid, kTokens, 0, stream>>>(params);
  KeyDiffScoreKernel<kDType, kHeadDim><<<grid, kTokens, 0, stream>>>(params);
  return cudaGetLastError();
}

#define KVC_INSTANTIATE_KNORM(dtype, head_dim)                                                  \
  template cudaError_t LaunchKnormScores<dtype, head_dim>(const KnormParams&, int, int64_t,     \
                                                          cudaStream_t);                        \
  template cudaError_t LaunchKeyDiffScores<dtype, head_dim>(const KeyDiffParams&, int, int64_t, \
                                                            cudaStream_t);                      \
  template cudaError_t LaunchTovaGroupSums<dtype, head_dim>(const TovaParams&, int, int64_t,    \
                                                            cudaStream_t);

KVC_INSTANTIATE_KNORM(DType::kFloat16, 64)
KVC_INSTANTIATE_KNORM(DType::kFloat16, 128)
KVC_INSTANTIATE_KNORM(DType::kFloat16, 256)
KVC_INSTANTIATE_KNORM(DType::kBFloat16, 64)
KVC_INSTANTIATE_KNORM(DType::kBFloat16, 128)
KVC_INSTANTIATE_KNORM(DType::kBFloat16, 256)
KVC_INSTANTIATE_KNORM(DType::kFloat32, 64)
KVC_INSTANTIATE_KNORM(DType::kFloat32, 128)
KVC_INSTANTIATE_KNORM(DType::kFloat32, 256)

#undef KVC_INSTANTIATE_KNORM

}  // namespace kvcompress::cuda
