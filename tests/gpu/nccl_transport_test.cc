// The nccl transport and forwarding on a machine with two GPUs. kvcd runs on GPU 0 with
// --backend=cuda --allow_cuda_ipc --allow_nccl.
//  - nccl in: this process sends a fixed-seed random cache from GPU 1 over a TO_KVCD channel;
//    the results equal, byte for byte, the inline transport's for the same tensors.
//  - forwarding, three processes: kvc_decode_example on GPU 1 opens a FROM_KVCD channel and
//    listens; this process (the prefill worker, GPU 0) compresses through cuda_ipc with the
//    decode channel as forward_channel_id; the stream returns only the summary, and the
//    decode worker's dumps equal the inline results byte for byte. Then nccl in + forward.
//  - faults: a client that announces layers but never sends them (DEADLINE_EXCEEDED within
//    the deadline, the channel aborted, device memory back to 0, kvcd serving); a client
//    killed mid-transfer (a child process: this binary re-run with KVC_NCCL_CHILD set; kvcd
//    lets go of everything within seconds, not at the stream's deadline, and keeps serving);
//    a decode worker killed before a forward (the request fails, memory back to 0, kvcd
//    serving).
//
// Skipped with fewer than two CUDA devices. Run: ctest -R gpu_nccl_transport_test.
#include <cuda_runtime_api.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/device_cache_sender.h"
#include "client/nccl_channel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_support.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress {
namespace {

using ::kvcompress::testing::DeviceMemoryInUse;
using ::kvcompress::testing::KvcdProcess;
using ::testing::AnyOf;

constexpr int kLayers = 4;
constexpr int kKvHeads = 8;
constexpr int kQueryHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kTokens = 3000;
constexpr int kWindow = 32;

int DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  (void)cudaGetLastError();
  return count;
}

v1::CompressHeader Header(const std::string& request_id) {
  v1::CompressHeader header;
  header.set_request_id(request_id);
  v1::CacheGeometry& geometry = *header.mutable_geometry();
  geometry.set_num_layers(kLayers);
  geometry.set_num_kv_heads(kKvHeads);
  geometry.set_num_query_heads(kQueryHeads);
  geometry.set_head_dim(kHeadDim);
  geometry.set_dtype(v1::DTYPE_BFLOAT16);
  geometry.set_layout(v1::LAYOUT_HND);
  v1::SequenceShape& sequence = *header.add_sequences();
  sequence.set_num_tokens(kTokens);
  sequence.set_num_window_queries(kWindow);
  header.mutable_method()->mutable_scorer()->mutable_snapkv()->set_window_size(kWindow);
  header.mutable_method()->mutable_head_budget()->mutable_adaptive();
  header.mutable_method()->set_keep_ratio(0.1);
  return header;
}

constexpr size_t kKvBytes = size_t{kKvHeads} * kTokens * kHeadDim * 2;
constexpr size_t kQueryBytes = size_t{kQueryHeads} * kWindow * kHeadDim * 2;

// [layer][keys, values, queries] bytes: bf16 of N(0, 1) draws, fixed seed.
std::vector<std::vector<std::vector<std::byte>>> RandomCache() {
  std::mt19937 generator(20261123);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<std::vector<std::vector<std::byte>>> cache(kLayers);
  for (auto& layer : cache) {
    for (size_t bytes : {kKvBytes, kKvBytes, kQueryBytes}) {
      std::vector<std::byte> tensor(bytes);
      for (size_t i = 0; i < bytes; i += 2) {
        const float x = normal(generator);
        uint32_t bits;
        std::memcpy(&bits, &x, 4);
        const uint16_t bf16 = static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
        std::memcpy(&tensor[i], &bf16, 2);
      }
      layer.push_back(std::move(tensor));
    }
  }
  return cache;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// kvc_decode_example on GPU 1 listening for `requests` forwarded requests.
class DecodeWorker {
 public:
  static std::unique_ptr<DecodeWorker> Start(const std::string& target, int requests) {
    auto worker = std::unique_ptr<DecodeWorker>(new DecodeWorker);
    worker->dir_ = testing::MakeScratchDir();
    const std::string channel_file = worker->dir_ + "/channel";
    absl::StatusOr<pid_t> pid = testing::SpawnProcess(
        {testing::BinDir() + "/kvc_decode_example", "--target=" + target, "--device=1",
         "--channel-id-file=" + channel_file, absl::StrCat("--requests=", requests),
         "--dump-dir=" + worker->dir_ + "/dumps", "--transfer-timeout=20"},
        worker->dir_ + "/decode.log");
    EXPECT_TRUE(pid.ok()) << pid.status();
    if (!pid.ok()) return nullptr;
    worker->pid_ = *pid;
    for (int i = 0; i < 600 && worker->channel_id_.empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      worker->channel_id_ = ReadFile(channel_file);
      while (!worker->channel_id_.empty() && worker->channel_id_.back() == '\n') {
        worker->channel_id_.pop_back();
      }
    }
    EXPECT_FALSE(worker->channel_id_.empty()) << ReadFile(worker->dir_ + "/decode.log");
    // The id is published before the listener attaches; give it a moment to.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    return worker;
  }
  ~DecodeWorker() { Kill(); }

  const std::string& channel_id() const { return channel_id_; }
  std::string log() const { return ReadFile(dir_ + "/decode.log"); }
  std::string Dump(const std::string& request_id, int layer) const {
    return ReadFile(absl::StrCat(dir_, "/dumps/", request_id, "/seq0_layer", layer, ".bin"));
  }
  // The exit status after it ends by itself (up to `seconds`), or -1.
  int Wait(int seconds) {
    for (int i = 0; i < seconds * 10 && pid_ > 0; ++i) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return -1;
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  std::string dir_;
  std::string channel_id_;
  pid_t pid_ = -1;
};

class NcclTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("KVC_NCCL_CHILD") != nullptr) GTEST_SKIP() << "child process";
    if (DeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices";
    auto kvcd = KvcdProcess::Start({"--backend=cuda", "--cuda_device=0", "--allow_cuda_ipc",
                                    "--allow_nccl", "--channel_idle_timeout=30s"});
    ASSERT_TRUE(kvcd.ok()) << kvcd.status();
    kvcd_ = std::move(kvcd).value();
    auto client = Client::Connect(kvcd_->target());
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(client).value();
    cache_ = RandomCache();
    for (const auto& layer : cache_) {
      tensors_.push_back(LayerTensors{layer[0], layer[1], layer[2], {}});
    }
    want_ = Inline();
  }

  std::vector<CompressedLayer> Inline() {
    CacheRequest request;
    request.header = Header("inline");
    request.tensors = {tensors_};
    absl::StatusOr<CompressedCache> result = client_->CompressCache(request);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->layers[0] : std::vector<CompressedLayer>();
  }

  // Sends the cache from `device` through `transport`; returns the session's summary and
  // collects inline results into `got` (unless forwarded).
  absl::StatusOr<v1::CompressSummary> Send(int device, v1::Transport transport,
                                           v1::CompressHeader header,
                                           std::vector<CompressedLayer>* got,
                                           absl::Duration deadline = absl::Seconds(60)) {
    if (cudaSetDevice(device) != cudaSuccess) return absl::InternalError("cudaSetDevice");
    DeviceCacheSenderOptions options;
    options.transport = transport;
    options.connect_timeout = absl::Seconds(30);
    options.transfer_timeout = absl::Seconds(30);
    absl::StatusOr<std::unique_ptr<DeviceCacheSender>> sender =
        DeviceCacheSender::Create(*client_, tensors_, options);
    if (!sender.ok()) return sender.status();
    (*sender)->Attach(header);
    SessionOptions session_options;
    session_options.deadline = deadline;
    absl::StatusOr<std::unique_ptr<CompressSession>> session =
        client_->StartCompress(header, std::move(session_options));
    if (!session.ok()) return session.status();
    for (int l = 0; l < kLayers; ++l) {
      if (absl::Status sent = (*sender)->SendLayer(**session, l); !sent.ok()) {
        (*session)->Cancel();
        return sent;
      }
    }
    absl::Status sends = (*sender)->WaitForSends();
    absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
    if (!summary.ok()) return summary.status();
    if (!sends.ok()) return sends;
    if (got != nullptr) {
      got->assign(kLayers, CompressedLayer());
      while (true) {
        absl::StatusOr<std::optional<CompressedLayer>> next = (*session)->NextResult();
        if (!next.ok()) return next.status();
        if (!next->has_value()) break;
        got->at((*next)->layer) = std::move(**next);
      }
    }
    return summary;
  }

  void ExpectDumpsEqualInline(const DecodeWorker& decode, const std::string& request_id) {
    for (int l = 0; l < kLayers; ++l) {
      SCOPED_TRACE(absl::StrCat("layer ", l));
      const CompressedLayer& layer = want_.at(l);
      std::string expected;
      expected.append(reinterpret_cast<const char*>(layer.keys.data()), layer.keys.size());
      expected.append(reinterpret_cast<const char*>(layer.values.data()), layer.values.size());
      expected.append(reinterpret_cast<const char*>(layer.positions.data()),
                      layer.positions.size() * sizeof(int32_t));
      const std::string dump = decode.Dump(request_id, l);
      EXPECT_EQ(dump.size(), expected.size());
      EXPECT_TRUE(dump == expected) << "the forwarded bytes differ from the inline result";
    }
  }

  std::unique_ptr<KvcdProcess> kvcd_;
  std::unique_ptr<Client> client_;
  std::vector<std::vector<std::vector<std::byte>>> cache_;
  std::vector<LayerTensors> tensors_;
  std::vector<CompressedLayer> want_;
};

TEST_F(NcclTransportTest, NcclInputEqualsTheInlineTransport) {
  ASSERT_EQ(want_.size(), static_cast<size_t>(kLayers));
  for (int round = 0; round < 2; ++round) {
    std::vector<CompressedLayer> got;
    absl::StatusOr<v1::CompressSummary> summary =
        Send(1, v1::TRANSPORT_NCCL, Header(absl::StrCat("nccl-", round)), &got);
    ASSERT_TRUE(summary.ok()) << summary.status();
    EXPECT_EQ(summary->bytes_in(), uint64_t{kLayers} * (2 * kKvBytes + kQueryBytes));
    ASSERT_EQ(got.size(), want_.size());
    for (int l = 0; l < kLayers; ++l) {
      SCOPED_TRACE(absl::StrCat("layer ", l));
      EXPECT_EQ(got[l].kept, want_[l].kept);
      EXPECT_EQ(got[l].positions, want_[l].positions);
      EXPECT_TRUE(got[l].keys == want_[l].keys);
      EXPECT_TRUE(got[l].values == want_[l].values);
    }
  }
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
}

TEST_F(NcclTransportTest, ForwardsToADecodeWorkerInAnotherProcess) {
  std::unique_ptr<DecodeWorker> decode = DecodeWorker::Start(kvcd_->target(), 2);
  ASSERT_NE(decode, nullptr);
  // cuda_ipc in on kvcd's GPU, forwarded over NCCL to GPU 1: the recommended deployment.
  v1::CompressHeader header = Header("fwd-ipc");
  header.set_forward_channel_id(decode->channel_id());
  std::vector<CompressedLayer> got;
  absl::StatusOr<v1::CompressSummary> summary = Send(0, v1::TRANSPORT_CUDA_IPC, header, &got);
  ASSERT_TRUE(summary.ok()) << summary.status() << "\n" << decode->log();
  EXPECT_EQ(summary->forwarded_layers(), static_cast<uint32_t>(kLayers));
  EXPECT_TRUE(got.empty() || got[0].kept.empty()) << "forwarded layers came back inline";
  // nccl in from GPU 1, forwarded to GPU 1's decode worker.
  header = Header("fwd-nccl");
  header.set_forward_channel_id(decode->channel_id());
  summary = Send(1, v1::TRANSPORT_NCCL, header, nullptr);
  ASSERT_TRUE(summary.ok()) << summary.status() << "\n" << decode->log();
  EXPECT_EQ(summary->forwarded_layers(), static_cast<uint32_t>(kLayers));
  EXPECT_EQ(decode->Wait(60), 0) << decode->log();
  ExpectDumpsEqualInline(*decode, "fwd-ipc");
  ExpectDumpsEqualInline(*decode, "fwd-nccl");
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
}

TEST_F(NcclTransportTest, AClientThatNeverSendsFailsByTheDeadlineAndKvcdServes) {
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  NcclChannelOptions options;
  options.connect_timeout = absl::Seconds(30);
  absl::StatusOr<std::unique_ptr<NcclChannel>> channel =
      OpenNcclChannel(*client_, v1::CHANNEL_DIRECTION_TO_KVCD, options);
  ASSERT_TRUE(channel.ok()) << channel.status();
  v1::CompressHeader header = Header("stall");
  (*channel)->Attach(header);
  SessionOptions session_options;
  session_options.deadline = absl::Seconds(4);
  auto session = client_->StartCompress(header, std::move(session_options));
  ASSERT_TRUE(session.ok()) << session.status();
  const auto started = std::chrono::steady_clock::now();
  // Announced, never sent: kvcd's receives can never complete.
  for (int l = 0; l < kLayers; ++l) {
    if (!(*session)->SendLayerAnnouncement(0, l).ok()) break;  // the stream may fail first
  }
  absl::StatusOr<v1::CompressSummary> summary = (*session)->Finish();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_EQ(summary.status().code(), absl::StatusCode::kDeadlineExceeded) << summary.status();
  EXPECT_LT(seconds, 15.0);
  // kvcd let go of the receive buffers, aborted the channel and keeps serving.
  for (int i = 0; i < 50 && DeviceMemoryInUse(*client_) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  v1::CompressHeader again = Header("stall-again");
  (*channel)->Attach(again);
  auto second = client_->StartCompress(again);
  ASSERT_TRUE(second.ok());
  (void)(*second)->SendLayerAnnouncement(0, 0);  // may already see the failure
  EXPECT_EQ((*second)->Finish().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Inline().size(), static_cast<size_t>(kLayers));
  EXPECT_TRUE(kvcd_->Alive());
}

TEST_F(NcclTransportTest, AKilledDecodeWorkerFailsTheForwardAndKvcdServes) {
  std::unique_ptr<DecodeWorker> decode = DecodeWorker::Start(kvcd_->target(), 0);
  ASSERT_NE(decode, nullptr);
  const std::string channel_id = decode->channel_id();
  decode->Kill();
  std::this_thread::sleep_for(std::chrono::seconds(1));
  v1::CompressHeader header = Header("to-the-dead");
  header.set_forward_channel_id(channel_id);
  const auto started = std::chrono::steady_clock::now();
  absl::StatusOr<v1::CompressSummary> summary =
      Send(0, v1::TRANSPORT_CUDA_IPC, header, nullptr, absl::Seconds(5));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_THAT(summary.status().code(),
              AnyOf(absl::StatusCode::kFailedPrecondition, absl::StatusCode::kDeadlineExceeded))
      << summary.status();
  EXPECT_LT(seconds, 20.0);
  for (int i = 0; i < 50 && DeviceMemoryInUse(*client_) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  EXPECT_EQ(Inline().size(), static_cast<size_t>(kLayers));
  EXPECT_TRUE(kvcd_->Alive());
}

// The killed client: started by AClientKilledMidTransfer..., it sends two layers of four over
// nccl from GPU 1, announces the third without sending it (so kvcd is receiving), and waits
// to be killed.
TEST(NcclChild, SendTwoLayersAnnounceAThirdAndWait) {
  const char* target = std::getenv("KVC_NCCL_CHILD");
  const char* ready_file = std::getenv("KVC_NCCL_CHILD_READY");
  if (target == nullptr || ready_file == nullptr) GTEST_SKIP() << "only as a child process";
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  auto client = Client::Connect(target);
  ASSERT_TRUE(client.ok());
  const auto cache = RandomCache();
  std::vector<LayerTensors> tensors;
  for (const auto& layer : cache) tensors.push_back(LayerTensors{layer[0], layer[1], layer[2], {}});
  DeviceCacheSenderOptions options;
  options.transport = v1::TRANSPORT_NCCL;
  auto sender = DeviceCacheSender::Create(**client, tensors, options);
  ASSERT_TRUE(sender.ok()) << sender.status();
  v1::CompressHeader header = Header("killed");
  (*sender)->Attach(header);
  SessionOptions session_options;
  session_options.deadline = absl::Seconds(120);
  auto session = (*client)->StartCompress(header, std::move(session_options));
  ASSERT_TRUE(session.ok());
  ASSERT_TRUE((*sender)->SendLayer(**session, 0).ok());
  ASSERT_TRUE((*sender)->SendLayer(**session, 1).ok());
  ASSERT_TRUE((*session)->SendLayerAnnouncement(0, 2).ok());
  std::ofstream(ready_file) << "ready\n";
  std::this_thread::sleep_for(std::chrono::minutes(5));
}

TEST_F(NcclTransportTest, AClientKilledMidTransferReleasesEverythingWithinSeconds) {
  const std::string ready_file = testing::MakeScratchDir() + "/ready";
  const pid_t child = testing::SpawnSelf(
      "NcclChild.*", {"KVC_NCCL_CHILD=" + kvcd_->target(), "KVC_NCCL_CHILD_READY=" + ready_file});
  ASSERT_GE(child, 0);
  const bool ready = testing::WaitForFile(ready_file);
  if (!ready) kill(child, SIGKILL);
  ASSERT_TRUE(ready) << "the child never sent its layers";
  const auto killed_at = std::chrono::steady_clock::now();
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  // The stream's deadline is 120 s and --nccl_timeout 120 s: letting go within seconds means
  // the cancelled stream aborted its channel instead of waiting for the receive.
  for (int i = 0; i < 200 && DeviceMemoryInUse(*client_) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  EXPECT_EQ(DeviceMemoryInUse(*client_), 0u);
  EXPECT_LT(seconds, 10.0);
  ASSERT_TRUE(kvcd_->Alive());
  // kvcd serves nccl clients as before.
  std::vector<CompressedLayer> got;
  absl::StatusOr<v1::CompressSummary> summary =
      Send(1, v1::TRANSPORT_NCCL, Header("after-the-kill"), &got);
  ASSERT_TRUE(summary.ok()) << summary.status();
  ASSERT_EQ(got.size(), want_.size());
  for (int l = 0; l < kLayers; ++l) {
    EXPECT_EQ(got[l].positions, want_[l].positions);
    EXPECT_TRUE(got[l].keys == want_[l].keys);
  }
}

}  // namespace
}  // namespace kvcompress
