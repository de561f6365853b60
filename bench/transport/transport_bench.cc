// transport_bench: kvcd's GPU transports against the raw link, on a machine with two GPUs
// (bench/RESULTS.md, "GPU transports"). kvcd runs on GPU 0 (started by run.sh); this process
// plays the prefill worker and the decode worker.
//
//  1. raw link: NCCL send/recv of the whole cache GPU 0 → GPU 1 and GPU 1 → GPU 0, layer by
//     layer (keys and values per layer, one group each), between two communicators of this
//     process; and cudaMemcpyPeer of the same bytes (the peer copy cuda_ipc avoids entirely).
//  2. nccl ingest: the cache sent from GPU 1 to kvcd on GPU 0 over a TO_KVCD channel with
//     streaming (the cheapest scorer) keeping 64 tokens a head (so that the inline results are
//     small), from the first send to the summary.
//  3. end to end, "prefill done" → "compact cache at decode": kvcd reads the prefill cache
//     on GPU 0 in place (cuda_ipc), compresses, and forwards each layer over NCCL to the decode
//     worker on GPU 1 (a listener thread here); against the raw NCCL send of the full cache
//     GPU 0 → GPU 1 (1). Channels are opened and regions registered before the clock starts,
//     as a serving system does once.
//
// Usage: transport_bench --target=127.0.0.1:PORT [--tokens=32768] [--layers=32]
//          [--methods=snapkv,knorm,streaming] [--keep=0.1] [--repeats=5] [--json=PATH]
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/client.h"
#include "client/cuda_ipc_channel.h"
#include "client/nccl_channel.h"

namespace kvcompress {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string target;
  int tokens = 32768;
  int layers = 32;
  int kv_heads = 8;
  int query_heads = 32;
  int head_dim = 128;
  int window = 64;
  double keep = 0.1;
  int repeats = 5;
  std::vector<std::string> methods = {"snapkv", "knorm", "streaming"};
  std::string json;
};

#define CHECK_CUDA(expr)                                                                        \
  do {                                                                                          \
    const cudaError_t e = (expr);                                                               \
    if (e != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)
#define CHECK_NCCL(expr)                                                                        \
  do {                                                                                          \
    const ncclResult_t r = (expr);                                                              \
    if (r != ncclSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, ncclGetErrorString(r)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)
#define CHECK_OK(expr)                                                                         \
  do {                                                                                         \
    const absl::Status s = (expr);                                                             \
    if (!s.ok()) {                                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, s.ToString().c_str()); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The cache of one sequence on one device: per layer keys, values (bf16, [H_kv, T, D]) and
// window queries ([H_q, W, D]), in one allocation, random bytes of bf16 N(0,1) draws.
struct DeviceCache {
  int device = 0;
  std::byte* base = nullptr;
  uint64_t kv_bytes = 0, query_bytes = 0, stride = 0, total = 0;
  std::byte* keys(int l) const { return base + l * stride; }
  std::byte* values(int l) const { return keys(l) + kv_bytes; }
  std::byte* queries(int l) const { return values(l) + kv_bytes; }
};

DeviceCache MakeCache(const Options& options, int device) {
  DeviceCache cache;
  cache.device = device;
  cache.kv_bytes = uint64_t{2} * options.kv_heads * options.tokens * options.head_dim;
  cache.query_bytes = uint64_t{2} * options.query_heads * options.window * options.head_dim;
  cache.stride = (2 * cache.kv_bytes + cache.query_bytes + 255) / 256 * 256;
  cache.total = cache.stride * options.layers;
  CHECK_CUDA(cudaSetDevice(device));
  CHECK_CUDA(cudaMalloc(&cache.base, cache.total));
  // One random layer copied to every layer: the values matter for the kept set, not the time.
  std::vector<uint16_t> host(cache.stride / 2);
  std::mt19937 generator(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (uint16_t& h : host) {
    const float x = normal(generator);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    h = static_cast<uint16_t>(bits >> 16);
  }
  for (int l = 0; l < options.layers; ++l) {
    CHECK_CUDA(cudaMemcpy(cache.keys(l), host.data(), cache.stride, cudaMemcpyHostToDevice));
  }
  return cache;
}

v1::CompressHeader Header(const Options& options, const std::string& method, int repeat) {
  v1::CompressHeader header;
  header.set_request_id(absl::StrCat(method, "-", repeat));
  v1::CacheGeometry& geometry = *header.mutable_geometry();
  geometry.set_num_layers(options.layers);
  geometry.set_num_kv_heads(options.kv_heads);
  geometry.set_num_query_heads(options.query_heads);
  geometry.set_head_dim(options.head_dim);
  geometry.set_dtype(v1::DTYPE_BFLOAT16);
  geometry.set_layout(v1::LAYOUT_HND);
  v1::SequenceShape& sequence = *header.add_sequences();
  sequence.set_num_tokens(options.tokens);
  v1::Scorer& scorer = *header.mutable_method()->mutable_scorer();
  if (method == "snapkv") {
    sequence.set_num_window_queries(options.window);
    scorer.mutable_snapkv()->set_window_size(options.window);
  } else if (method == "knorm") {
    scorer.mutable_knorm();
  } else {
    scorer.mutable_streaming();
  }
  header.mutable_method()->set_keep_ratio(options.keep);
  return header;
}

// Two communicators of this process, rank 0 on GPU 0 and rank 1 on GPU 1.
struct RawLink {
  ncclComm_t comms[2];
  cudaStream_t streams[2];
  RawLink() {
    const int devices[2] = {0, 1};
    CHECK_NCCL(ncclCommInitAll(comms, 2, devices));
    for (int d = 0; d < 2; ++d) {
      CHECK_CUDA(cudaSetDevice(d));
      CHECK_CUDA(cudaStreamCreateWithFlags(&streams[d], cudaStreamNonBlocking));
    }
  }
  // Sends keys and values of every layer from `from` to the other GPU; seconds.
  double SendCache(const DeviceCache& source, const DeviceCache& sink, int layers) {
    const int from = source.device, to = sink.device;
    for (int d : {0, 1}) {
      CHECK_CUDA(cudaSetDevice(d));
      CHECK_CUDA(cudaStreamSynchronize(streams[d]));
    }
    const Clock::time_point start = Clock::now();
    for (int l = 0; l < layers; ++l) {
      CHECK_NCCL(ncclGroupStart());
      CHECK_NCCL(
          ncclSend(source.keys(l), source.kv_bytes, ncclUint8, to, comms[from], streams[from]));
      CHECK_NCCL(
          ncclSend(source.values(l), source.kv_bytes, ncclUint8, to, comms[from], streams[from]));
      CHECK_NCCL(ncclRecv(sink.keys(l), sink.kv_bytes, ncclUint8, from, comms[to], streams[to]));
      CHECK_NCCL(ncclRecv(sink.values(l), sink.kv_bytes, ncclUint8, from, comms[to], streams[to]));
      CHECK_NCCL(ncclGroupEnd());
    }
    for (int d : {0, 1}) {
      CHECK_CUDA(cudaSetDevice(d));
      CHECK_CUDA(cudaStreamSynchronize(streams[d]));
    }
    return Seconds(Clock::now() - start);
  }
};

double PeerCopy(const DeviceCache& source, const DeviceCache& sink, int layers) {
  CHECK_CUDA(cudaSetDevice(sink.device));
  CHECK_CUDA(cudaDeviceSynchronize());
  const Clock::time_point start = Clock::now();
  for (int l = 0; l < layers; ++l) {
    CHECK_CUDA(cudaMemcpyPeerAsync(sink.keys(l), sink.device, source.keys(l), source.device,
                                   2 * source.kv_bytes));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  return Seconds(Clock::now() - start);
}

// The decode worker: a FROM_KVCD channel on GPU 1 and a thread receiving forwarded layers.
class DecodeListener {
 public:
  explicit DecodeListener(Client& client) : client_(client) {
    CHECK_CUDA(cudaSetDevice(1));
    auto channel = OpenNcclChannel(client, v1::CHANNEL_DIRECTION_FROM_KVCD);
    CHECK_OK(channel.status());
    channel_ = std::move(channel).value();
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    // One receive slot per layer in flight.
    CHECK_CUDA(cudaMalloc(&buffer_, kSlots * kSlotBytes));
    auto stream = client.ReceiveForwarded(channel_->id(), absl::InfiniteDuration());
    CHECK_OK(stream.status());
    notices_ = std::move(stream).value();
    reader_ = std::thread([this] { Read(); });
    thread_ = std::thread([this] { Run(); });
  }
  ~DecodeListener() {
    notices_->Cancel();
    reader_.join();
    thread_.join();
  }
  const std::string& channel_id() const { return channel_->id(); }
  // Blocks until request `request_id` ended; returns when (steady clock) every layer's bytes
  // were in GPU 1's memory, and the layers received.
  std::pair<Clock::time_point, int> WaitForEnd(const std::string& request_id) {
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (ended_ == request_id) return {last_layer_at_, layers_};
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  void Reset() {
    std::lock_guard<std::mutex> lock(mu_);
    ended_.clear();
    layers_ = 0;
  }

 private:
  // Reads notices into the queue as they come, so that the receiving thread finds every
  // notice that arrived while it was busy and receives those layers with one NCCL group.
  void Read() {
    while (true) {
      absl::StatusOr<std::optional<v1::ForwardNotice>> notice = notices_->Next();
      std::lock_guard<std::mutex> lock(queue_mu_);
      if (!notice.ok() || !notice->has_value()) {
        closed_ = true;
        queue_cv_.notify_one();
        return;
      }
      queue_.push_back(std::move(**notice));
      queue_cv_.notify_one();
    }
  }

  void Run() {
    CHECK_CUDA(cudaSetDevice(1));
    int received = 0;
    std::vector<v1::ForwardNotice> notices;
    std::vector<const v1::ForwardedLayer*> layers;
    std::vector<ForwardedLayerBuffers> buffers;
    const auto flush = [&] {
      if (layers.empty()) return;
      CHECK_OK(channel_->ReceiveLayers(layers, buffers, stream_));
      layers.clear();
      buffers.clear();
    };
    while (true) {
      {
        std::unique_lock<std::mutex> lock(queue_mu_);
        queue_cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
        if (queue_.empty()) return;
        notices.assign(std::make_move_iterator(queue_.begin()),
                       std::make_move_iterator(queue_.end()));
        queue_.clear();
      }
      for (const v1::ForwardNotice& notice : notices) {
        if (notice.has_layer()) {
          // Every layer gets a slot of its own, so receives of later layers are posted while
          // earlier ones are in flight; the stream is synchronised once, at the request's end.
          const v1::LayerResult& result = notice.layer().result();
          std::byte* slot = buffer_ + (received++ % kSlots) * kSlotBytes;
          if (result.keys_bytes() + result.values_bytes() + result.positions_bytes() > kSlotBytes) {
            std::fprintf(stderr, "a forwarded layer exceeds the receive slot\n");
            std::exit(1);
          }
          {
            std::lock_guard<std::mutex> lock(mu_);
            if (received == 1) first_notice_at_ = Clock::now();
            last_notice_at_ = Clock::now();
          }
          ForwardedLayerBuffers out;
          out.keys = slot;
          out.values = slot + result.keys_bytes();
          out.positions =
              reinterpret_cast<int32_t*>(slot + result.keys_bytes() + result.values_bytes());
          layers.push_back(&notice.layer());
          buffers.push_back(out);
        } else {
          flush();
          const Clock::time_point synchronize_started = Clock::now();
          CHECK_OK(channel_->Synchronize(stream_, absl::Seconds(30)));
          if (notice.end().status_code() != 0) {
            std::fprintf(stderr, "forwarded request failed: %s\n",
                         notice.end().status_message().c_str());
          }
          std::lock_guard<std::mutex> lock(mu_);
          end_notice_at_ = synchronize_started;
          layers_ = received;
          received = 0;
          last_layer_at_ = Clock::now();
          ended_ = notice.end().request_id();
        }
      }
      flush();
    }
  }

  static constexpr int kSlots = 64;
  static constexpr uint64_t kSlotBytes = uint64_t{64} << 20;

  Client& client_;
  std::unique_ptr<NcclChannel> channel_;
  std::unique_ptr<ForwardStream> notices_;
  cudaStream_t stream_ = nullptr;
  std::byte* buffer_ = nullptr;
  std::thread reader_, thread_;
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<v1::ForwardNotice> queue_;
  bool closed_ = false;
  std::mutex mu_;
  std::string ended_;
  int layers_ = 0;
  Clock::time_point last_layer_at_;

 public:
  // When the last request's first and last layer notices and its end notice arrived.
  Clock::time_point first_notice_at_, last_notice_at_, end_notice_at_;
};

LayerRegions Regions(const CudaIpcChannel& channel, uint32_t region, const DeviceCache& cache,
                     int layer, bool queries) {
  LayerRegions regions;
  regions.keys = *channel.Slice(region, cache.keys(layer), cache.kv_bytes);
  regions.values = *channel.Slice(region, cache.values(layer), cache.kv_bytes);
  if (queries) regions.queries = *channel.Slice(region, cache.queries(layer), cache.query_bytes);
  return regions;
}

int Run(const Options& options) {
  int devices = 0;
  CHECK_CUDA(cudaGetDeviceCount(&devices));
  if (devices < 2) {
    std::fprintf(stderr, "transport_bench needs two GPUs, found %d\n", devices);
    return 1;
  }
  auto client = Client::Connect(options.target);
  CHECK_OK(client.status());
  DeviceCache gpu0 = MakeCache(options, 0);
  DeviceCache gpu1 = MakeCache(options, 1);
  const double kv_total = 2.0 * gpu0.kv_bytes * options.layers;
  std::string json = "{";

  // 1. The raw link.
  RawLink raw;
  std::vector<double> forward_raw, backward_raw, peer;
  raw.SendCache(gpu0, gpu1, options.layers);  // warm-up
  raw.SendCache(gpu1, gpu0, options.layers);
  for (int r = 0; r < options.repeats; ++r) {
    forward_raw.push_back(raw.SendCache(gpu0, gpu1, options.layers));
    backward_raw.push_back(raw.SendCache(gpu1, gpu0, options.layers));
    peer.push_back(PeerCopy(gpu1, gpu0, options.layers));
  }
  const double raw01 = Median(forward_raw), raw10 = Median(backward_raw), peer10 = Median(peer);
  std::printf("cache: %d layers x %d tokens, K+V %.3f GiB (bf16, %d KV heads, D=%d)\n",
              options.layers, options.tokens, kv_total / (1 << 30), options.kv_heads,
              options.head_dim);
  std::printf("raw nccl GPU0->GPU1: %.3f ms  %.1f GB/s\n", raw01 * 1e3, kv_total / raw01 / 1e9);
  std::printf("raw nccl GPU1->GPU0: %.3f ms  %.1f GB/s\n", raw10 * 1e3, kv_total / raw10 / 1e9);
  std::printf("raw peer copy GPU1->GPU0: %.3f ms  %.1f GB/s\n", peer10 * 1e3,
              kv_total / peer10 / 1e9);
  absl::StrAppend(&json, "\"kv_bytes\":", kv_total, ",\"raw_nccl_0to1_s\":", raw01,
                  ",\"raw_nccl_1to0_s\":", raw10, ",\"peer_copy_1to0_s\":", peer10);

  // 2. nccl ingest into kvcd (streaming: the cheapest scorer, so the link dominates).
  {
    CHECK_CUDA(cudaSetDevice(1));
    auto channel = OpenNcclChannel(**client, v1::CHANNEL_DIRECTION_TO_KVCD);
    CHECK_OK(channel.status());
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<double> ingest;
    for (int r = 0; r < options.repeats + 1; ++r) {
      v1::CompressHeader header = Header(options, "streaming", r);
      header.set_request_id(absl::StrCat("ingest-", r));
      // 64 tokens a head: the inline results (8 MiB for the whole cache) cost next to
      // nothing, so the time is the ingest's.
      header.mutable_method()->set_keep_tokens(64);
      (*channel)->Attach(header);
      const Clock::time_point start = Clock::now();
      auto session = (*client)->StartCompress(header);
      CHECK_OK(session.status());
      for (int l = 0; l < options.layers; ++l) {
        DeviceLayerTensors tensors;
        tensors.keys = gpu1.keys(l);
        tensors.values = gpu1.values(l);
        CHECK_OK((*channel)->SendLayer(**session, 0, l, tensors, stream));
      }
      CHECK_OK((*channel)->Synchronize(stream, absl::Seconds(60)));
      auto summary = (*session)->Finish();
      CHECK_OK(summary.status());
      if (r > 0) ingest.push_back(Seconds(Clock::now() - start));  // first: warm-up
    }
    const double seconds = Median(ingest);
    std::printf(
        "kvcd nccl ingest GPU1->GPU0 (streaming, 64 tokens/head inline): %.3f ms  %.1f GB/s  "
        "= %.0f%% of raw nccl\n",
        seconds * 1e3, kv_total / seconds / 1e9, 100.0 * raw10 / seconds);
    absl::StrAppend(&json, ",\"kvcd_nccl_ingest_s\":", seconds);
    CHECK_CUDA(cudaStreamDestroy(stream));
  }

  // 3. End to end: cuda_ipc in on GPU 0, forwarded to GPU 1.
  CHECK_CUDA(cudaSetDevice(0));
  auto ipc = OpenCudaIpcChannel(**client);
  CHECK_OK(ipc.status());
  auto region = (*ipc)->RegisterRegion(gpu0.base, gpu0.total);
  CHECK_OK(region.status());
  DecodeListener decode(**client);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the listener attaches
  absl::StrAppend(&json, ",\"end_to_end\":{");
  for (size_t m = 0; m < options.methods.size(); ++m) {
    const std::string& method = options.methods[m];
    std::vector<double> seconds;
    uint64_t kept_bytes = 0;
    for (int r = 0; r < options.repeats + 1; ++r) {
      decode.Reset();
      v1::CompressHeader header = Header(options, method, r);
      header.set_forward_channel_id(decode.channel_id());
      (*ipc)->Attach(header);
      CHECK_CUDA(cudaSetDevice(0));
      const Clock::time_point start = Clock::now();  // prefill done: the cache is on GPU 0
      auto session = (*client)->StartCompress(header);
      CHECK_OK(session.status());
      for (int l = 0; l < options.layers; ++l) {
        CHECK_OK(
            (*session)->SendLayerReady(0, l, Regions(**ipc, *region, gpu0, l, method == "snapkv")));
      }
      const Clock::time_point announced = Clock::now();
      auto summary = (*session)->Finish();
      CHECK_OK(summary.status());
      const Clock::time_point summarised = Clock::now();
      const auto [done, layers] = decode.WaitForEnd(header.request_id());
      if (r == options.repeats) {
        const auto ms = [&](Clock::time_point t) { return Seconds(t - start) * 1e3; };
        const v1::StageTimings& t = summary->timings();
        std::printf(
            "  %s timeline (ms from start): layers announced %.3f, first notice at "
            "decode %.3f, last layer notice %.3f, summary %.3f, end notice %.3f, all "
            "bytes at decode %.3f; kvcd: receive %.3f, queue %.3f, score %.3f, select "
            "%.3f, gather %.3f, total %.3f (stage times summed over layers)\n",
            method.c_str(), ms(announced), ms(decode.first_notice_at_), ms(decode.last_notice_at_),
            ms(summarised), ms(decode.end_notice_at_), ms(done), t.receive_seconds() * 1e3,
            t.queue_seconds() * 1e3, t.score_seconds() * 1e3, t.select_seconds() * 1e3,
            t.gather_seconds() * 1e3, t.total_seconds() * 1e3);
      }
      if (layers != options.layers) {
        std::fprintf(stderr, "decode received %d of %d layers\n", layers, options.layers);
        return 1;
      }
      kept_bytes = summary->bytes_out();
      if (r > 0) seconds.push_back(Seconds(done - start));
    }
    const double ours = Median(seconds);
    std::printf(
        "end to end %s keep %.2f: cuda_ipc + compress + forward %.3f ms (%.1f MiB "
        "forwarded) vs full cache over nccl %.3f ms: %.2fx\n",
        method.c_str(), options.keep, ours * 1e3, kept_bytes / 1048576.0, raw01 * 1e3,
        raw01 / ours);
    absl::StrAppend(&json, m ? "," : "", "\"", method, "\":{\"seconds\":", ours,
                    ",\"forwarded_bytes\":", kept_bytes, ",\"speedup\":", raw01 / ours, "}");
  }
  absl::StrAppend(&json, "}}");
  if (!options.json.empty()) std::ofstream(options.json) << json << "\n";
  return 0;
}

}  // namespace
}  // namespace kvcompress

int main(int argc, char** argv) {
  kvcompress::Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* name) -> const char* {
      const std::string prefix = std::string("--") + name + "=";
      return arg.rfind(prefix, 0) == 0 ? argv[i] + prefix.size() : nullptr;
    };
    if (const char* v = value("target")) {
      options.target = v;
    } else if (const char* v = value("tokens")) {
      options.tokens = std::atoi(v);
    } else if (const char* v = value("layers")) {
      options.layers = std::atoi(v);
    } else if (const char* v = value("keep")) {
      options.keep = std::atof(v);
    } else if (const char* v = value("repeats")) {
      options.repeats = std::atoi(v);
    } else if (const char* v = value("methods")) {
      options.methods = absl::StrSplit(v, ',');
    } else if (const char* v = value("json")) {
      options.json = v;
    } else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (options.target.empty()) {
    std::fprintf(stderr, "usage: transport_bench --target=HOST:PORT [...]\n");
    return 2;
  }
  return kvcompress::Run(options);
}
