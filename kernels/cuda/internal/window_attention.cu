// Window attention of SnapKV (and of the attention-mass pass of every scorer): W query rows
// per query head against the T keys of their KV head, causal inside the window, in two passes
// that never hold a T × W matrix:
//   1. WindowStatsKernel: per (head, key chunk, row block) the softmax max and Σexp of each
//      query row over the chunk (online, in registers); StatsCombineKernel merges the chunks.
//   2. ColumnSumKernel: per (head, key chunk, query blocks) Σ_i softmax_ij over the block's
//      rows for each key j — the column sums pooling and the attention mass read.
// 16-bit inputs compute logits on tensor cores (mma.sync m16n8k16, fp32 accumulate; the
// products of two 16-bit floats are exact in fp32); fp32 inputs use plain FMAs in the same
// fragment layout. Softmax arithmetic is fp32 with ex2.approx in log2 units.
#include <cfloat>
#include <climits>

#include "kernels/cuda/internal/device_utils.cuh"
#include "kernels/cuda/internal/kernel_params.h"

namespace kvcompress::cuda {
namespace {

// kRowTiles > 0 overrides the m16 tiles a warp holds in the first pass (the second pass always
// uses the default configuration).
template <DType kDType, int kD, int kRowTiles = 0>
struct AttentionConfig {
  using Traits = ElementTraits<kDType>;
  static constexpr bool kIsFloat32 = Traits::kIsFloat32;
  static constexpr bool kIsBFloat16 = Traits::kIsBFloat16;
  static constexpr int kElementSize = Traits::kSize;
  static constexpr int kHeadDim = kD;
  static constexpr int kChunks = kD * kElementSize / 16;  // 16-byte chunks per row
  static constexpr AttentionTiling kTiling = AttentionTilingFor(kDType, kD);
  static constexpr int kMTiles = kRowTiles > 0 ? kRowTiles : kTiling.rows_per_warp / 16;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kRowsPerBlock = kRowsPerWarp * 8;
  static constexpr int kKeysPerTile = kTiling.keys_per_tile;
  static constexpr int kStages = kTiling.stages;
  static constexpr int kKSteps = kD / 16;  // mma k-steps of 16-bit inputs
  // One row tile per warp where the default holds more: 4 key tiles, 4 mma chains per warp.
  static constexpr int kNTiles =
      kRowTiles == 1 && !kIsFloat32 && kTiling.rows_per_warp > 16 ? 4 : kTiling.n_tiles;
  static constexpr int kQueryMultiple = kTiling.query_multiple;
  static constexpr int kTileChunks = kKeysPerTile * kChunks;
  using Tile = SwizzledTile<kChunks>;
  static_assert(kKeysPerTile % (8 * kNTiles) == 0, "key tiles hold whole n8 tile groups");
  static_assert(kRowTiles != 0 || kQueryMultiple == 8 * kNTiles,
                "query blocks hold whole n8 tile groups");
  static_assert(kTileChunks * 16 == 16384, "a key tile is 16 KiB");
};

// Where head `head`'s key rows lie: row j starts at head_base + j · stride_bytes.
struct KeyRows {
  const std::byte* head_base;
  int64_t stride_bytes;
};

template <class Cfg>
__device__ __forceinline__ KeyRows HeadKeyRows(const DeviceJob& job, const BatchShape& shape,
                                               int head) {
  constexpr int64_t kRowBytes = Cfg::kHeadDim * Cfg::kElementSize;
  if (shape.layout == Layout::kHND) {
    return KeyRows{job.keys + static_cast<int64_t>(head) * job.num_tokens * kRowBytes, kRowBytes};
  }
  return KeyRows{job.keys + static_cast<int64_t>(head) * kRowBytes,
                 static_cast<int64_t>(shape.num_kv_heads) * kRowBytes};
}

// Copies rows [first_key, first_key + kRows) of a head's keys into a swizzled tile (rows at
// or past key_limit are zero-filled), spread over threads thread, thread + kStride, ….
template <class Cfg, int kRows, int kStride>
__device__ __forceinline__ void LoadKeyRows(uint4* tile, const KeyRows& rows, int64_t first_key,
                                            int64_t key_limit, int thread) {
  static_assert(kRows * Cfg::kChunks % kStride == 0, "whole rounds of copies");
#pragma unroll
  for (int round = 0; round < kRows * Cfg::kChunks / kStride; ++round) {
    const int index = thread + round * kStride;
    const int row = index / Cfg::kChunks;
    const int chunk = index % Cfg::kChunks;
    const int64_t key = first_key + row;
    const bool valid = key < key_limit;
    const std::byte* source = rows.head_base + (valid ? key * rows.stride_bytes + chunk * 16 : 0);
    CpAsync16(tile + Cfg::Tile::Offset(row, chunk), source, valid ? 16 : 0);
  }
}

// The query row `row` (g·window + i) of head `head`: query head head·G + g, window query i, the
// (num_sent − window + i)-th query sent.
template <class Cfg>
__device__ __forceinline__ const std::byte* QueryRow(const DeviceJob& job, const BatchShape& shape,
                                                     int head, int member, int index) {
  const int64_t query_head = static_cast<int64_t>(head) * shape.group_size + member;
  const int64_t sent_index = job.num_sent - job.window + index;
  return job.queries + (query_head * job.num_sent + sent_index) * Cfg::kHeadDim * Cfg::kElementSize;
}

// fp32 inputs: acc += the m16n8 tile A[a_row + {0, 8}] · B[b_row + {0, 1}] in mma's C layout
// (acc[0]: (a_row, b_row), acc[1]: (a_row, b_row + 1), acc[2]: (a_row + 8, b_row),
// acc[3]: (a_row + 8, b_row + 1)), from two swizzled fp32 tiles.
template <class Cfg>
__device__ __forceinline__ void SimtTile(float (&acc)[4], const uint4* a_tile, int a_row,
                                         const uint4* b_tile, int b_row) {
#pragma unroll 8
  for (int chunk = 0; chunk < Cfg::kChunks; ++chunk) {
    const float4 a0 = reinterpret_cast<const float4&>(a_tile[Cfg::Tile::Offset(a_row, chunk)]);
    const float4 a1 = reinterpret_cast<const float4&>(a_tile[Cfg::Tile::Offset(a_row + 8, chunk)]);
    const float4 b0 = reinterpret_cast<const float4&>(b_tile[Cfg::Tile::Offset(b_row, chunk)]);
    const float4 b1 = reinterpret_cast<const float4&>(b_tile[Cfg::Tile::Offset(b_row + 1, chunk)]);
    acc[0] = fmaf(a0.x, b0.x, fmaf(a0.y, b0.y, fmaf(a0.z, b0.z, fmaf(a0.w, b0.w, acc[0]))));
    acc[1] = fmaf(a0.x, b1.x, fmaf(a0.y, b1.y, fmaf(a0.z, b1.z, fmaf(a0.w, b1.w, acc[1]))));
    acc[2] = fmaf(a1.x, b0.x, fmaf(a1.y, b0.y, fmaf(a1.z, b0.z, fmaf(a1.w, b0.w, acc[2]))));
    acc[3] = fmaf(a1.x, b1.x, fmaf(a1.y, b1.y, fmaf(a1.z, b1.z, fmaf(a1.w, b1.w, acc[3]))));
  }
}

// Merges softmax partial (max_b, sum_b) into (max_a, sum_a); a sum of 0 means "no keys".
__device__ __forceinline__ void MergeStats(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float merged = fmaxf(max_a, max_b);
  const float a = sum_a > 0.0f ? sum_a * Exp2(max_a - merged) : 0.0f;
  const float b = sum_b > 0.0f ? sum_b * Exp2(max_b - merged) : 0.0f;
  max_a = merged;
  sum_a = a + b;
}

template <DType kDType, int kHeadDim, int kRowTiles>
__global__ void __launch_bounds__(kAttentionThreads, kRowTiles == 1 ? 3 : 2)
    WindowStatsKernel(const WindowStatsParams params) {
  using Cfg = AttentionConfig<kDType, kHeadDim, kRowTiles>;
  using Tile = typename Cfg::Tile;
  extern __shared__ uint4 shared[];
  const AttentionItem item = params.items[blockIdx.x];
  const DeviceJob& job = params.jobs[item.job];
  const BatchShape shape = params.shape;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int window = job.window;
  const int num_rows = shape.group_size * window;
  const int64_t prefix = job.prefix;
  const int head = item.head;

  uint4* query_tile = shared;
  uint4* key_ring = Cfg::kIsFloat32 ? shared + Cfg::kRowsPerBlock * Cfg::kChunks : shared;

  // Query rows [row_begin, row_begin + kRowsPerBlock); rows past the head's are zero.
  for (int index = threadIdx.x; index < Cfg::kRowsPerBlock * Cfg::kChunks; index += blockDim.x) {
    const int local = index / Cfg::kChunks;
    const int chunk = index % Cfg::kChunks;
    const int row = item.row_begin + local;
    const bool valid = row < item.row_end;
    const std::byte* source =
        valid ? QueryRow<Cfg>(job, shape, head, row / window, row % window) + chunk * 16
              : job.queries;
    CpAsync16(query_tile + Tile::Offset(local, chunk), source, valid ? 16 : 0);
  }
  CpAsyncCommit();

  uint32_t query_fragments[Cfg::kIsFloat32 ? 1 : Cfg::kMTiles][Cfg::kIsFloat32 ? 1 : Cfg::kKSteps]
                          [4];
  if constexpr (!Cfg::kIsFloat32) {
    CpAsyncWait<0>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
        const int row = warp * Cfg::kRowsPerWarp + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        LdMatrixX4(query_fragments[mt][ks], query_tile + Tile::Offset(row, ks * 2 + (lane >> 4)));
      }
    }
    __syncthreads();  // the key ring reuses the query tile's space
  }

  int64_t row_limit[Cfg::kMTiles][2];  // last key the row sees: P + i
  float row_max[Cfg::kMTiles][2];
  float row_sum[Cfg::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = item.row_begin + warp * Cfg::kRowsPerWarp + mt * 16 + (lane >> 2) + half * 8;
      row_limit[mt][half] = prefix + (row < num_rows ? row % window : 0);
      row_max[mt][half] = -INFINITY;
      row_sum[mt][half] = 0.0f;
    }
  }

  const int64_t key_begin = item.key_begin;
  const int64_t key_end = item.key_end;
  const int num_tiles = static_cast<int>((key_end - key_begin + Cfg::kKeysPerTile - 1) /
                                         Cfg::kKeysPerTile);
  const float scale = params.scale_log2;
  const KeyRows key_rows = HeadKeyRows<Cfg>(job, shape, head);
#pragma unroll
  for (int stage = 0; stage < Cfg::kStages - 1; ++stage) {
    if (stage < num_tiles) {
      LoadKeyRows<Cfg, Cfg::kKeysPerTile, kAttentionThreads>(
          key_ring + stage * Cfg::kTileChunks, key_rows,
          key_begin + static_cast<int64_t>(stage) * Cfg::kKeysPerTile, key_end, threadIdx.x);
    }
    CpAsyncCommit();
  }

  for (int t = 0; t < num_tiles; ++t) {
    CpAsyncWait<Cfg::kStages - 2>();
    __syncthreads();
    {
      const int next = t + Cfg::kStages - 1;
      if (next < num_tiles) {
        LoadKeyRows<Cfg, Cfg::kKeysPerTile, kAttentionThreads>(
            key_ring + (next % Cfg::kStages) * Cfg::kTileChunks, key_rows,
            key_begin + static_cast<int64_t>(next) * Cfg::kKeysPerTile, key_end, threadIdx.x);
      }
      CpAsyncCommit();
    }
    const uint4* tile = key_ring + (t % Cfg::kStages) * Cfg::kTileChunks;
    const int64_t tile_key0 = key_begin + static_cast<int64_t>(t) * Cfg::kKeysPerTile;
    const bool needs_mask =
        tile_key0 + Cfg::kKeysPerTile > prefix || tile_key0 + Cfg::kKeysPerTile > key_end;
    // kNTiles n8 tiles at once: kNTiles · kMTiles independent mma chains per warp.
    for (int group = 0; group < Cfg::kKeysPerTile / (8 * Cfg::kNTiles); ++group) {
      float acc[Cfg::kNTiles][Cfg::kMTiles][4];
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
        for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
          acc[nt][mt][0] = acc[nt][mt][1] = acc[nt][mt][2] = acc[nt][mt][3] = 0.0f;
        }
      }
      if constexpr (Cfg::kIsFloat32) {
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
          for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
            SimtTile<Cfg>(acc[nt][mt], query_tile,
                          warp * Cfg::kRowsPerWarp + mt * 16 + (lane >> 2), tile,
                          (group * Cfg::kNTiles + nt) * 8 + 2 * (lane & 3));
          }
        }
      } else {
#pragma unroll
        for (int ks = 0; ks < Cfg::kKSteps; ks += 2) {
          uint32_t b[Cfg::kNTiles][4];
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
            LdMatrixX4(b[nt], tile + Tile::Offset((group * Cfg::kNTiles + nt) * 8 + (lane & 7),
                                                  ks * 2 + (lane >> 3)));
          }
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
            for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
              Mma16816<Cfg::kIsBFloat16>(acc[nt][mt], query_fragments[mt][ks], b[nt][0], b[nt][1]);
            }
          }
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
            for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
              Mma16816<Cfg::kIsBFloat16>(acc[nt][mt], query_fragments[mt][ks + 1], b[nt][2],
                                         b[nt][3]);
            }
          }
        }
      }
      const int64_t key0 = tile_key0 + group * Cfg::kNTiles * 8 + 2 * (lane & 3);
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // Raw logits (q·k); the scale is positive, so maxima can be taken before scaling.
          float v[2 * Cfg::kNTiles];
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = acc[nt][mt][2 * half + e];
              if (needs_mask) {
                const int64_t key = key0 + nt * 8 + e;
                if (key > row_limit[mt][half] || key >= key_end) x = -INFINITY;
              }
              v[2 * nt + e] = x;
            }
          }
          float tree[2 * Cfg::kNTiles];
#pragma unroll
          for (int k = 0; k < 2 * Cfg::kNTiles; ++k) tree[k] = v[k];
#pragma unroll
          for (int width = Cfg::kNTiles; width >= 1; width /= 2) {
#pragma unroll
            for (int k = 0; k < width; ++k) tree[k] = fmaxf(tree[k], tree[k + width]);
          }
          const float group_max = tree[0];
          float& m = row_max[mt][half];  // raw units
          float& s = row_sum[mt][half];
          if (group_max > m) {
            s *= Exp2((m - group_max) * scale);
            m = group_max;
          }
          if (m != -INFINITY) {
            const float bias = -m * scale;
#pragma unroll
            for (int k = 0; k < 2 * Cfg::kNTiles; ++k) tree[k] = Exp2(fmaf(v[k], scale, bias));
#pragma unroll
            for (int width = Cfg::kNTiles; width >= 1; width /= 2) {
#pragma unroll
              for (int k = 0; k < width; ++k) tree[k] += tree[k + width];
            }
            s += tree[0];
          }
        }
      }
    }
  }
  CpAsyncWait<0>();

  // Each row's partial is spread over the 4 lanes of a quad (2 columns each): merge them.
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float m = row_max[mt][half] * scale;  // scaled (log2) units from here on
      float s = row_sum[mt][half];
#pragma unroll
      for (int offset = 1; offset <= 2; offset <<= 1) {
        const float other_max = __shfl_xor_sync(0xffffffffu, m, offset);
        const float other_sum = __shfl_xor_sync(0xffffffffu, s, offset);
        MergeStats(m, s, other_max, other_sum);
      }
      const int row = item.row_begin + warp * Cfg::kRowsPerWarp + mt * 16 + (lane >> 2) + half * 8;
      if ((lane & 3) == 0 && row < item.row_end) {
        PartialStats out;
        out.max_x = s > 0.0f ? m : -INFINITY;
        out.sum = s;
        params.partial[job.partial_offset +
                       (static_cast<int64_t>(head) * num_rows + row) * job.num_chunks +
                       item.chunk] = out;
      }
    }
  }
}

// A warp per query row: lanes merge strided chunks, then a butterfly merges the lanes (a fixed
// order, so the result is deterministic).
__global__ void StatsCombineKernel(const StatsCombineParams params) {
  const JobHead job_head = params.job_heads[blockIdx.y];
  const DeviceJob& job = params.jobs[job_head.job];
  const int num_rows = params.shape.group_size * job.window;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= num_rows) return;
  const int64_t row_index = static_cast<int64_t>(job_head.head) * num_rows + row;
  const PartialStats* partial = params.partial + job.partial_offset + row_index * job.num_chunks;
  float m = -INFINITY;
  float s = 0.0f;
  for (int chunk = lane; chunk < job.num_chunks; chunk += 32) {
    const PartialStats part = partial[chunk];
    MergeStats(m, s, part.max_x, part.sum);
  }
#pragma unroll
  for (int offset = 16; offset >= 1; offset >>= 1) {
    const float other_max = __shfl_xor_sync(0xffffffffu, m, offset);
    const float other_sum = __shfl_xor_sync(0xffffffffu, s, offset);
    MergeStats(m, s, other_max, other_sum);
  }
  if (lane == 0) {
    RowStats stats;
    stats.max_x = m;
    stats.inv_sum = 1.0f / s;
    params.stats[job.stats_offset + row_index] = stats;
  }
}

template <DType kDType, int kHeadDim>
__global__ void __launch_bounds__(kAttentionThreads, 2)
    ColumnSumKernel(const ColumnSumParams params) {
  using Cfg = AttentionConfig<kDType, kHeadDim>;
  using Tile = typename Cfg::Tile;
  // One m16 tile of keys per warp (16 keys): few registers, so two blocks fit an SM.
  constexpr int kKeyTiles = 1;
  constexpr int kKeysPerWarp = 16 * kKeyTiles;
  constexpr int kRoundKeys = 8 * kKeysPerWarp;
  static_assert(kRoundKeys == kColumnSumRoundKeys, "planner and kernel agree on rounds");
  extern __shared__ uint4 shared[];
  const AttentionItem item = params.items[blockIdx.x];
  const DeviceJob& job = params.jobs[item.job];
  const BatchShape shape = params.shape;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int head = item.head;
  const int window = job.window;
  const int num_rows = shape.group_size * window;
  const int block_rows = job.qblock_rows;
  const int blocks_per_member = job.qblocks_per_member;
  const int num_qblocks = shape.group_size * blocks_per_member;
  const int64_t prefix = job.prefix;
  const int64_t num_tokens = job.num_tokens;
  const int capacity = params.query_capacity;

  uint4* key_slices = shared;
  uint4* query_tile = shared + kRoundKeys * Cfg::kChunks;
  float* query_bias = reinterpret_cast<float*>(query_tile + capacity * Cfg::kChunks);
  int* query_index = reinterpret_cast<int*>(query_bias + 2 * capacity);

  // The item's query blocks, each padded to a multiple of 8 rows (zero rows, weight 0).
  {
    int base = 0;
    for (int qb = item.row_begin; qb < item.row_end; ++qb) {
      const int member = qb / blocks_per_member;
      const int first = (qb % blocks_per_member) * block_rows;
      const int count = min(block_rows, window - first);
      const int padded = (count + Cfg::kQueryMultiple - 1) / Cfg::kQueryMultiple * Cfg::kQueryMultiple;
      for (int index = threadIdx.x; index < padded * Cfg::kChunks; index += blockDim.x) {
        const int local = index / Cfg::kChunks;
        const int chunk = index % Cfg::kChunks;
        const bool valid = local < count;
        const std::byte* source =
            valid ? QueryRow<Cfg>(job, shape, head, member, first + local) + chunk * 16
                  : job.queries;
        CpAsync16(query_tile + Tile::Offset(base + local, chunk), source, valid ? 16 : 0);
      }
      for (int local = threadIdx.x; local < padded; local += blockDim.x) {
        if (local < count) {
          const RowStats stats =
              params.stats[job.stats_offset + static_cast<int64_t>(head) * num_rows +
                           member * window + first + local];
          // softmax_ij = 2^(x_ij − max_i) / sum_i = 2^(x_ij − bias_i): one FFMA and one ex2.
          query_bias[base + local] = stats.max_x - log2f(stats.inv_sum);
          query_index[base + local] = first + local;
        } else {
          query_bias[base + local] = INFINITY;  // padding rows weigh 0
          query_index[base + local] = INT_MAX / 2;
        }
      }
      base += padded;
    }
  }
  CpAsyncCommit();

  const int64_t key_begin = item.key_begin;
  const int64_t key_end = item.key_end;
  const int64_t round_keys = kRoundKeys;
  const int num_rounds = static_cast<int>((key_end - key_begin + round_keys - 1) / round_keys);
  uint4* slice = key_slices + warp * kKeysPerWarp * Cfg::kChunks;
  const KeyRows key_rows = HeadKeyRows<Cfg>(job, shape, head);
  auto load_slice = [&](int round) {
    LoadKeyRows<Cfg, kKeysPerWarp, 32>(
        slice, key_rows, key_begin + round * round_keys + warp * kKeysPerWarp, key_end, lane);
  };
  load_slice(0);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();

  const float scale = params.scale_log2;
  for (int round = 0; round < num_rounds; ++round) {
    const int64_t warp_key0 = key_begin + round * round_keys + warp * kKeysPerWarp;
    uint32_t key_fragments[Cfg::kIsFloat32 ? 1 : kKeyTiles][Cfg::kIsFloat32 ? 1 : Cfg::kKSteps]
                          [4];
    if constexpr (!Cfg::kIsFloat32) {
      if (round > 0) {
        CpAsyncWait<0>();
        __syncwarp();
      }
#pragma unroll
      for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
        for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
          const int row = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          LdMatrixX4(key_fragments[mt][ks], slice + Tile::Offset(row, ks * 2 + (lane >> 4)));
        }
      }
      __syncwarp();
      if (round + 1 < num_rounds) load_slice(round + 1);
      CpAsyncCommit();
    } else {
      if (round > 0) {
        __syncwarp();  // every lane is done with the previous round's slice
        load_slice(round);
        CpAsyncCommit();
        CpAsyncWait<0>();
        __syncwarp();
      }
    }
    if (warp_key0 >= key_end) continue;
    const bool needs_mask = warp_key0 + kKeysPerWarp - 1 > prefix;

    int query_row = 0;
    for (int qb = item.row_begin; qb < item.row_end; ++qb) {
      const int first = (qb % blocks_per_member) * block_rows;
      const int count = min(block_rows, window - first);
      const int padded = (count + Cfg::kQueryMultiple - 1) / Cfg::kQueryMultiple * Cfg::kQueryMultiple;
      float row_sum[kKeyTiles][2];
#pragma unroll
      for (int mt = 0; mt < kKeyTiles; ++mt) row_sum[mt][0] = row_sum[mt][1] = 0.0f;

      for (int group = 0; group < padded / Cfg::kQueryMultiple; ++group) {
        const int group_row = query_row + group * Cfg::kQueryMultiple;
        float acc[Cfg::kNTiles][kKeyTiles][4];
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
          for (int mt = 0; mt < kKeyTiles; ++mt) {
            acc[nt][mt][0] = acc[nt][mt][1] = acc[nt][mt][2] = acc[nt][mt][3] = 0.0f;
          }
        }
        if constexpr (Cfg::kIsFloat32) {
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
            for (int mt = 0; mt < kKeyTiles; ++mt) {
              SimtTile<Cfg>(acc[nt][mt], slice, mt * 16 + (lane >> 2), query_tile,
                            group_row + nt * 8 + 2 * (lane & 3));
            }
          }
        } else {
#pragma unroll
          for (int ks = 0; ks < Cfg::kKSteps; ks += 2) {
            uint32_t b[Cfg::kNTiles][4];
#pragma unroll
            for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
              LdMatrixX4(b[nt], query_tile + Tile::Offset(group_row + nt * 8 + (lane & 7),
                                                          ks * 2 + (lane >> 3)));
            }
#pragma unroll
            for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
              for (int mt = 0; mt < kKeyTiles; ++mt) {
                Mma16816<Cfg::kIsBFloat16>(acc[nt][mt], key_fragments[mt][ks], b[nt][0], b[nt][1]);
              }
            }
#pragma unroll
            for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
              for (int mt = 0; mt < kKeyTiles; ++mt) {
                Mma16816<Cfg::kIsBFloat16>(acc[nt][mt], key_fragments[mt][ks + 1], b[nt][2],
                                           b[nt][3]);
              }
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
          const int column = group_row + nt * 8 + 2 * (lane & 3);
          const float bias0 = query_bias[column];
          const float bias1 = query_bias[column + 1];
          const int64_t limit0 = prefix + query_index[column];
          const int64_t limit1 = prefix + query_index[column + 1];
#pragma unroll
          for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              float p0 = Exp2(fmaf(acc[nt][mt][2 * half], scale, -bias0));
              float p1 = Exp2(fmaf(acc[nt][mt][2 * half + 1], scale, -bias1));
              if (needs_mask) {
                const int64_t key = warp_key0 + mt * 16 + (lane >> 2) + half * 8;
                if (key > limit0) p0 = 0.0f;
                if (key > limit1) p1 = 0.0f;
              }
              row_sum[mt][half] += p0 + p1;
            }
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float total = row_sum[mt][half];
          total += __shfl_xor_sync(0xffffffffu, total, 1);
          total += __shfl_xor_sync(0xffffffffu, total, 2);
          const int64_t key = warp_key0 + mt * 16 + (lane >> 2) + half * 8;
          if ((lane & 3) == 0 && key < key_end) {
            params.colsum[job.colsum_offset +
                          (static_cast<int64_t>(head) * num_qblocks + qb) * num_tokens + key] =
                total;
          }
        }
      }
      query_row += padded;
    }
  }
  CpAsyncWait<0>();
}

}  // namespace

template <DType kDType, int kHeadDim, int kRowTiles>
cudaError_t LaunchWindowStatsVariant(const WindowStatsParams& params, cudaStream_t stream) {
  using Cfg = AttentionConfig<kDType, kHeadDim, kRowTiles>;
  constexpr size_t kShared = WindowStatsSharedBytes(kDType, kHeadDim, Cfg::kRowsPerBlock);
  const auto kernel = WindowStatsKernel<kDType, kHeadDim, kRowTiles>;
  if (const cudaError_t error = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kShared));
      error != cudaSuccess) {
    return error;
  }
  if (const cudaError_t error = cudaFuncSetAttribute(
          kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
      error != cudaSuccess) {
    return error;
  }
  kernel<<<params.num_items, kAttentionThreads, kShared, stream>>>(params);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim>
cudaError_t LaunchWindowStats(const WindowStatsParams& params, cudaStream_t stream) {
  if (params.num_items == 0) return cudaSuccess;
  constexpr AttentionTiling kTiling = AttentionTilingFor(kDType, kHeadDim);
  if constexpr (kDType != DType::kFloat32 && kTiling.rows_per_warp > 16) {
    if (params.row_tiles == 1) return LaunchWindowStatsVariant<kDType, kHeadDim, 1>(params, stream);
  }
  return LaunchWindowStatsVariant<kDType, kHeadDim, 0>(params, stream);
}

template <DType kDType, int kHeadDim>
cudaError_t LaunchColumnSums(const ColumnSumParams& params, cudaStream_t stream) {
  if (params.num_items == 0) return cudaSuccess;
  const auto kernel = ColumnSumKernel<kDType, kHeadDim>;
  if (const cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(params.shared_bytes));
      error != cudaSuccess) {
    return error;
  }
  kernel<<<params.num_items, kAttentionThreads, params.shared_bytes, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t LaunchStatsCombine(const StatsCombineParams& params, int num_job_heads, int max_rows,
                               cudaStream_t stream) {
  if (num_job_heads == 0 || max_rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;  // 8 rows per block
  const dim3 grid((max_rows + 7) / 8, num_job_heads);
  StatsCombineKernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

#define KVC_INSTANTIATE_ATTENTION(dtype, head_dim)                                        \
  template cudaError_t LaunchWindowStats<dtype, head_dim>(const WindowStatsParams&,       \
                                                          cudaStream_t);                  \
  template cudaError_t LaunchColumnSums<dtype, head_dim>(const ColumnSumParams&, cudaStream_t);

KVC_INSTANTIATE_ATTENTION(DType::kFloat16, 64)
KVC_INSTANTIATE_ATTENTION(DType::kFloat16, 128)
KVC_INSTANTIATE_ATTENTION(DType::kFloat16, 256)
KVC_INSTANTIATE_ATTENTION(DType::kBFloat16, 64)
KVC_INSTANTIATE_ATTENTION(DType::kBFloat16, 128)
KVC_INSTANTIATE_ATTENTION(DType::kBFloat16, 256)
KVC_INSTANTIATE_ATTENTION(DType::kFloat32, 64)
KVC_INSTANTIATE_ATTENTION(DType::kFloat32, 128)
KVC_INSTANTIATE_ATTENTION(DType::kFloat32, 256)

#undef KVC_INSTANTIATE_ATTENTION

}  // namespace kvcompress::cuda
