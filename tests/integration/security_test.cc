// kvcd's security and operations surface against a real kvcd: TLS and mTLS with a PKI made
// by openssl at test time, the bearer token (and that health stays open without it),
// KVCD_* environment variables, the JSON-lines log with the client's request id, and `kvc`
// with its --tls* and --auth-token-file flags.
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "nlohmann/json.hpp"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/test_certificates.h"

namespace kvcompress::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "kvc-test-token-7f3a9c";
constexpr int kKeepTokens = 20;

// One sequence, 2 layers, 2 KV heads, GQA 2, head_dim 32, 97 tokens, fixed-seed bf16 data;
// knorm with 20 tokens per head.
struct SmallCache {
  v1::CompressHeader header;
  std::vector<std::vector<std::byte>> keys, values, queries;  // [layer]
};

SmallCache MakeSmallCache(const std::string& request_id) {
  SmallCache cache;
  auto* g = cache.header.mutable_geometry();
  g->set_num_layers(2);
  g->set_num_kv_heads(2);
  g->set_num_query_heads(4);
  g->set_head_dim(32);
  g->set_dtype(v1::DTYPE_BFLOAT16);
  g->set_layout(v1::LAYOUT_HND);
  cache.header.set_request_id(request_id);
  cache.header.mutable_method()->mutable_scorer()->mutable_knorm();
  cache.header.mutable_method()->set_keep_tokens(kKeepTokens);
  auto* sequence = cache.header.add_sequences();
  sequence->set_num_tokens(97);
  sequence->set_num_window_queries(8);
  std::mt19937 rng(20240501);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random_bf16 = [&](size_t elements) {
    std::vector<std::byte> bytes(elements * 2);
    for (size_t i = 0; i < elements; ++i) {
      const uint16_t bits = FloatToBFloat16(normal(rng));
      std::memcpy(&bytes[i * 2], &bits, 2);
    }
    return bytes;
  };
  for (int l = 0; l < 2; ++l) {
    cache.keys.push_back(random_bf16(2 * 97 * 32));
    cache.values.push_back(random_bf16(2 * 97 * 32));
    cache.queries.push_back(random_bf16(4 * 8 * 32));
  }
  return cache;
}

absl::StatusOr<CompressedCache> CompressSmall(Client& client, const std::string& request_id) {
  SmallCache cache = MakeSmallCache(request_id);
  CacheRequest request;
  request.header = cache.header;
  request.deadline = absl::Seconds(30);
  request.tensors.emplace_back();
  for (int l = 0; l < 2; ++l) {
    request.tensors[0].push_back(
        LayerTensors{cache.keys[l], cache.values[l], cache.queries[l], {}});
  }
  return client.CompressCache(request);
}

void ExpectKeptCounts(const absl::StatusOr<CompressedCache>& result) {
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->layers.size(), 1u);
  ASSERT_EQ(result->layers[0].size(), 2u);
  for (const CompressedLayer& layer : result->layers[0]) {
    EXPECT_EQ(layer.kept, std::vector<int32_t>({kKeepTokens, kKeepTokens}));
    EXPECT_EQ(layer.positions.size(), 2u * kKeepTokens);
  }
  EXPECT_EQ(result->summary.tokens_in(), 2u * 2 * 97);
  EXPECT_EQ(result->summary.tokens_kept(), 2u * 2 * kKeepTokens);
}

std::unique_ptr<Client> Connect(const std::string& target, ClientOptions options) {
  options.default_deadline = absl::Seconds(10);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(target, std::move(options));
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// The JSON lines of kvcd's log with event `event`, waiting (up to 10 s) until `done` holds.
std::vector<nlohmann::json> LogEvents(const KvcdProcess& kvcd, const std::string& event,
                                      const std::function<bool(const nlohmann::json&)>& wanted) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (true) {
    std::vector<nlohmann::json> events;
    bool found = false;
    std::ifstream in(kvcd.log_path());
    for (std::string line; std::getline(in, line);) {
      nlohmann::json parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      EXPECT_FALSE(parsed.is_discarded()) << "not a JSON line: " << line;
      if (parsed.is_discarded() || parsed.value("event", "") != event) continue;
      found = found || wanted(parsed);
      events.push_back(std::move(parsed));
    }
    if (found || std::chrono::steady_clock::now() > give_up) return events;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(MakeScratchDir());
    absl::StatusOr<TestCertificates> made = MakeTestCertificates(*dir_);
    ASSERT_TRUE(made.ok()) << made.status();
    certificates_ = new TestCertificates(*made);
    token_file_ = new std::string(*dir_ + "/token");
    std::ofstream(*token_file_) << kToken << "\n";
  }
  static void TearDownTestSuite() {
    delete certificates_;
    delete token_file_;
    delete dir_;
  }

  static std::vector<std::string> TlsFlags() {
    return {"--tls_cert=" + certificates_->server_cert, "--tls_key=" + certificates_->server_key};
  }
  static ClientOptions TrustingTheCa() {
    ClientOptions options;
    options.tls.root_ca_file = certificates_->ca_cert;
    return options;
  }

  static std::string* dir_;
  static TestCertificates* certificates_;
  static std::string* token_file_;
};

std::string* SecurityTest::dir_ = nullptr;
TestCertificates* SecurityTest::certificates_ = nullptr;
std::string* SecurityTest::token_file_ = nullptr;

TEST_F(SecurityTest, TlsClientTrustingTheCaCompresses) {
  auto kvcd = KvcdProcess::Start(TlsFlags());
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  std::unique_ptr<Client> client = Connect((*kvcd)->target(), TrustingTheCa());
  ASSERT_NE(client, nullptr);
  ExpectKeptCounts(CompressSmall(*client, "tls-1"));

  // The name in the certificate may also be given explicitly (DNS:localhost).
  ClientOptions by_name = TrustingTheCa();
  by_name.tls.server_name = "localhost";
  std::unique_ptr<Client> named = Connect((*kvcd)->target(), by_name);
  ASSERT_NE(named, nullptr);
  EXPECT_TRUE(named->GetServerInfo().ok());

  const std::vector<nlohmann::json> start =
      LogEvents(**kvcd, "start", [](const nlohmann::json&) { return true; });
  ASSERT_EQ(start.size(), 1u);
  EXPECT_EQ(start[0]["tls"], true);
  EXPECT_EQ(start[0]["mtls"], false);
  EXPECT_EQ(start[0]["auth_token"], false);
}

TEST_F(SecurityTest, ClientThatDoesNotTrustTheServerIsUnavailable) {
  auto kvcd = KvcdProcess::Start(TlsFlags());
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  ClientOptions other_ca;
  other_ca.tls.root_ca_file = certificates_->other_ca_cert;
  ClientOptions wrong_name = TrustingTheCa();
  wrong_name.tls.server_name = "kvcd.example.com";
  ClientOptions plaintext;
  for (const ClientOptions& options : {other_ca, wrong_name, plaintext}) {
    std::unique_ptr<Client> client = Connect((*kvcd)->target(), options);
    ASSERT_NE(client, nullptr);
    absl::StatusOr<v1::ServerInfo> info = client->GetServerInfo(absl::Seconds(5));
    EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable) << info.status();
  }
}

TEST_F(SecurityTest, MtlsRejectsClientsWithoutATrustedCertificateAndAcceptsOneWithIt) {
  std::vector<std::string> flags = TlsFlags();
  flags.push_back("--tls_client_ca=" + certificates_->ca_cert);
  auto kvcd = KvcdProcess::Start(flags);
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();

  std::unique_ptr<Client> anonymous = Connect((*kvcd)->target(), TrustingTheCa());
  ASSERT_NE(anonymous, nullptr);
  EXPECT_EQ(anonymous->GetServerInfo(absl::Seconds(5)).status().code(),
            absl::StatusCode::kUnavailable);

  ClientOptions untrusted = TrustingTheCa();
  untrusted.tls.cert_file = certificates_->other_client_cert;
  untrusted.tls.key_file = certificates_->other_client_key;
  std::unique_ptr<Client> stranger = Connect((*kvcd)->target(), untrusted);
  ASSERT_NE(stranger, nullptr);
  EXPECT_EQ(stranger->GetServerInfo(absl::Seconds(5)).status().code(),
            absl::StatusCode::kUnavailable);

  ClientOptions with_certificate = TrustingTheCa();
  with_certificate.tls.cert_file = certificates_->client_cert;
  with_certificate.tls.key_file = certificates_->client_key;
  std::unique_ptr<Client> client = Connect((*kvcd)->target(), with_certificate);
  ASSERT_NE(client, nullptr);
  ExpectKeptCounts(CompressSmall(*client, "mtls-1"));

  const std::vector<nlohmann::json> done = LogEvents(
      **kvcd, "compress", [](const auto& e) { return e.value("request_id", "") == "mtls-1"; });
  ASSERT_FALSE(done.empty());
  EXPECT_EQ(done.back()["authenticated"], true);
  EXPECT_EQ(done.back()["client_certificate"], "kvc-test-client");
}

TEST_F(SecurityTest, BearerTokenIsRequiredOnKvCompressButNotOnHealth) {
  auto kvcd = KvcdProcess::Start({"--auth_token_file=" + *token_file_});
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  const std::string target = (*kvcd)->target();

  std::unique_ptr<Client> no_token = Connect(target, {});
  ASSERT_NE(no_token, nullptr);
  absl::StatusOr<v1::ServerInfo> info = no_token->GetServerInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(info.status().message(), HasSubstr("missing bearer token"));
  EXPECT_THAT(info.status().message(), HasSubstr("authorization: Bearer <token>"));
  absl::StatusOr<CompressedCache> refused = CompressSmall(*no_token, "no-token-1");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);

  ClientOptions wrong;
  wrong.auth_token = "kvc-test-token-7f3a9d";
  std::unique_ptr<Client> wrong_token = Connect(target, wrong);
  ASSERT_NE(wrong_token, nullptr);
  absl::StatusOr<CompressedCache> rejected = CompressSmall(*wrong_token, "wrong-token-1");
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(rejected.status().message(), HasSubstr("not valid for this server"));
  EXPECT_THAT(rejected.status().message(), Not(HasSubstr("7f3a9")));

  ClientOptions right;
  right.auth_token_file = *token_file_;
  std::unique_ptr<Client> client = Connect(target, right);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->GetServerInfo().ok());
  ExpectKeptCounts(CompressSmall(*client, "token-1"));

  // Kubernetes probes carry no token.
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("kvcompress.v1.KvCompress");
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(health->Check(&context, request, &response).ok());
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  const std::vector<nlohmann::json> failures =
      LogEvents(**kvcd, "auth_failure", [](const auto& e) { return e["rpc"] == "Compress"; });
  ASSERT_GE(failures.size(), 3u);
  for (const nlohmann::json& failure : failures) {
    EXPECT_EQ(failure["code"], "UNAUTHENTICATED");
    EXPECT_THAT(failure["peer"].get<std::string>(), HasSubstr("127.0.0.1"));
    EXPECT_THAT(failure.dump(), Not(HasSubstr("7f3a9")));
  }
  const std::vector<nlohmann::json> done = LogEvents(
      **kvcd, "compress", [](const auto& e) { return e.value("request_id", "") == "token-1"; });
  ASSERT_FALSE(done.empty());
  EXPECT_EQ(done.back()["authenticated"], true);
}

TEST_F(SecurityTest, TokenFileFromTheEnvironmentIsEnforced) {
  auto kvcd = KvcdProcess::StartWithEnvironment({}, {"KVCD_AUTH_TOKEN_FILE=" + *token_file_});
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  std::unique_ptr<Client> no_token = Connect((*kvcd)->target(), {});
  ASSERT_NE(no_token, nullptr);
  EXPECT_EQ(no_token->GetServerInfo().status().code(), absl::StatusCode::kUnauthenticated);
  ClientOptions right;
  right.auth_token = kToken;
  std::unique_ptr<Client> client = Connect((*kvcd)->target(), right);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->GetServerInfo().ok());

  const std::vector<nlohmann::json> start =
      LogEvents(**kvcd, "start", [](const nlohmann::json&) { return true; });
  ASSERT_EQ(start.size(), 1u);
  EXPECT_EQ(start[0]["auth_token"], true);
  EXPECT_THAT(start[0]["flags_from_environment"].dump(), HasSubstr("KVCD_AUTH_TOKEN_FILE"));
}

TEST_F(SecurityTest, CommandLineWinsOverTheEnvironment) {
  // The variable names a file that does not exist; the flag names the real one.
  auto kvcd = KvcdProcess::StartWithEnvironment({"--auth_token_file=" + *token_file_},
                                                {"KVCD_AUTH_TOKEN_FILE=/nonexistent/token"});
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  ClientOptions right;
  right.auth_token = kToken;
  std::unique_ptr<Client> client = Connect((*kvcd)->target(), right);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->GetServerInfo().ok());
}

TEST_F(SecurityTest, BadEnvironmentValueOrTlsFileStopsKvcdNamingTheCause) {
  const std::string kvcd = BinDir() + "/kvcd";
  struct Case {
    std::vector<std::string> argv;
    std::string expected;
  };
  for (const Case& c : std::vector<Case>{
           {{"/usr/bin/env", "KVCD_MAX_LAYERS=many", kvcd, "--address=127.0.0.1:0",
             "--metrics_address="},
            "KVCD_MAX_LAYERS=\\\"many\\\" (flag --max_layers)"},
           {{kvcd, "--address=127.0.0.1:0", "--metrics_address=",
             "--tls_cert=" + certificates_->server_cert, "--tls_key=/nonexistent/key.pem"},
            "--tls_key /nonexistent/key.pem: no such file"},
           {{kvcd, "--address=127.0.0.1:0", "--metrics_address=",
             "--tls_cert=" + certificates_->server_cert, "--tls_key=" + certificates_->client_key},
            "does not belong"},
           {{kvcd, "--address=127.0.0.1:0",
             "--metrics_address=", "--auth_token_file=/nonexistent/token"},
            "--auth_token_file /nonexistent/token: no such file"},
       }) {
    absl::StatusOr<CommandResult> result = RunCommand(c.argv);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->exit_code, 1) << result->output;
    EXPECT_THAT(result->output, HasSubstr(c.expected));
    const nlohmann::json line = nlohmann::json::parse(result->output, nullptr, false);
    ASSERT_FALSE(line.is_discarded()) << result->output;
    EXPECT_EQ(line["event"], "start_failed");
  }
}

TEST_F(SecurityTest, LogLinesAreJsonAndCarryTheClientsRequestId) {
  auto kvcd = KvcdProcess::Start();
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  std::unique_ptr<Client> client = Connect((*kvcd)->target(), {});
  ASSERT_NE(client, nullptr);
  ExpectKeptCounts(CompressSmall(*client, "log-request-42"));

  // A header the server rejects still logs the client's id.
  SmallCache bad = MakeSmallCache("log-rejected-7");
  bad.header.mutable_method()->set_keep_ratio(2.0);
  auto session = client->StartCompress(bad.header);
  ASSERT_TRUE(session.ok()) << session.status();
  EXPECT_EQ((*session)->Finish().status().code(), absl::StatusCode::kInvalidArgument);

  const std::vector<nlohmann::json> events = LogEvents(**kvcd, "compress", [](const auto& e) {
    return e.value("request_id", "") == "log-rejected-7";
  });
  const nlohmann::json* ok = nullptr;
  const nlohmann::json* rejected = nullptr;
  for (const nlohmann::json& event : events) {
    if (event["request_id"] == "log-request-42") ok = &event;
    if (event["request_id"] == "log-rejected-7") rejected = &event;
  }
  ASSERT_NE(ok, nullptr);
  EXPECT_EQ((*ok)["code"], "OK");
  EXPECT_EQ((*ok)["method"], "knorm");
  EXPECT_EQ((*ok)["sequences"], 1);
  EXPECT_EQ((*ok)["layers"], 2);
  EXPECT_EQ((*ok)["tokens_in"], 2 * 2 * 97);
  EXPECT_EQ((*ok)["tokens_kept"], 2 * 2 * kKeepTokens);
  EXPECT_EQ((*ok)["bytes_in"], 2 * (2 * 2 * 97 * 32 * 2 + 4 * 8 * 32 * 2));
  EXPECT_GT((*ok)["bytes_out"].get<uint64_t>(), 0u);
  EXPECT_GE((*ok)["duration_ms"].get<double>(), 0.0);
  EXPECT_THAT((*ok)["peer"].get<std::string>(), HasSubstr("127.0.0.1"));
  ASSERT_NE(rejected, nullptr);
  EXPECT_EQ((*rejected)["code"], "INVALID_ARGUMENT");
  EXPECT_THAT((*rejected)["message"].get<std::string>(), HasSubstr("keep_ratio"));

  // Drain is logged too.
  absl::StatusOr<int> exit = (*kvcd)->Terminate(20);
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_FALSE(LogEvents(**kvcd, "drain_start", [](const auto&) { return true; }).empty());
  EXPECT_FALSE(LogEvents(**kvcd, "drain_end", [](const auto&) { return true; }).empty());
}

TEST_F(SecurityTest, KvcConnectsWithTlsAndTokenFlags) {
  std::vector<std::string> flags = TlsFlags();
  flags.push_back("--tls_client_ca=" + certificates_->ca_cert);
  flags.push_back("--auth_token_file=" + *token_file_);
  auto kvcd = KvcdProcess::Start(flags);
  ASSERT_TRUE(kvcd.ok()) << kvcd.status();
  const std::string kvc = BinDir() + "/kvc";
  const std::vector<std::string> connection = {"--server",          (*kvcd)->target(),
                                               "--tls-ca",          certificates_->ca_cert,
                                               "--tls-cert",        certificates_->client_cert,
                                               "--tls-key",         certificates_->client_key,
                                               "--tls-server-name", "localhost"};

  std::vector<std::string> info = {kvc, "info"};
  info.insert(info.end(), connection.begin(), connection.end());
  std::vector<std::string> info_with_token = info;
  info_with_token.insert(info_with_token.end(), {"--auth-token-file", *token_file_});
  absl::StatusOr<CommandResult> ok = RunCommand(info_with_token);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->exit_code, 0) << ok->output;
  EXPECT_THAT(ok->output, HasSubstr("version"));

  absl::StatusOr<CommandResult> no_token = RunCommand(info);
  ASSERT_TRUE(no_token.ok());
  EXPECT_EQ(no_token->exit_code, 1) << no_token->output;
  EXPECT_THAT(no_token->output, HasSubstr("UNAUTHENTICATED"));

  absl::StatusOr<CommandResult> half =
      RunCommand({kvc, "info", "--server", (*kvcd)->target(), "--tls-ca", certificates_->ca_cert,
                  "--tls-cert", certificates_->client_cert});
  ASSERT_TRUE(half.ok());
  EXPECT_EQ(half->exit_code, 2) << half->output;
  EXPECT_THAT(half->output, HasSubstr("--tls-cert and --tls-key go together"));

  const std::string input = *dir_ + "/kvc_input.safetensors";
  absl::StatusOr<CommandResult> synth =
      RunCommand({kvc, "synth", "--output", input, "--layers", "2", "--kv-heads", "2",
                  "--query-heads", "4", "--head-dim", "32", "--tokens", "128", "--window", "8"});
  ASSERT_TRUE(synth.ok());
  ASSERT_EQ(synth->exit_code, 0) << synth->output;
  std::vector<std::string> compress = {kvc,
                                       "compress",
                                       "--input",
                                       input,
                                       "--output",
                                       *dir_ + "/kvc_output.safetensors",
                                       "--method",
                                       "knorm",
                                       "--keep-tokens",
                                       "16",
                                       "--auth-token-file",
                                       *token_file_};
  compress.insert(compress.end(), connection.begin(), connection.end());
  absl::StatusOr<CommandResult> compressed = RunCommand(compress);
  ASSERT_TRUE(compressed.ok());
  EXPECT_EQ(compressed->exit_code, 0) << compressed->output;
}

}  // namespace
}  // namespace kvcompress::testing
