// The `kvc` binary's own behaviour, without a server: usage errors exit 2 with a message,
// runtime failures exit 1 with the status code name, synth + compress --local round trip.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "client/cache_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

struct ToolRun {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

std::string Kvc() {
  const char* dir = std::getenv("KVC_BIN_DIR");
  return std::string(dir ? dir : "bin") + "/kvc";
}

ToolRun RunKvc(const std::string& args) {
  ToolRun run;
  const std::string command = Kvc() + " " + args + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return run;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) run.output.append(buffer, n);
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

std::string Scratch(const std::string& name) { return ::testing::TempDir() + "kvc_tool_" + name; }

TEST(KvcToolTest, HelpAndUsageErrors) {
  ToolRun help = RunKvc("help");
  EXPECT_EQ(help.exit_code, 0) << help.output;
  EXPECT_THAT(help.output, HasSubstr("kvc compress"));
  EXPECT_THAT(help.output, HasSubstr("--keep-tokens"));

  EXPECT_EQ(RunKvc("").exit_code, 2);
  ToolRun unknown = RunKvc("squash");
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_THAT(unknown.output, HasSubstr("unknown command \"squash\""));

  ToolRun bad_flag = RunKvc("compress --local --inptu=x");
  EXPECT_EQ(bad_flag.exit_code, 2);
  EXPECT_THAT(bad_flag.output, HasSubstr("unknown flag --inptu"));

  ToolRun both = RunKvc(
      "compress --local --server=localhost:1 --input=a --output=b --method=knorm "
      "--keep=0.5");
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_THAT(both.output, HasSubstr("exactly one of --server"));

  ToolRun no_budget = RunKvc("compress --local --input=a --output=b --method=knorm");
  EXPECT_EQ(no_budget.exit_code, 2);
  EXPECT_THAT(no_budget.output, HasSubstr("--keep"));

  ToolRun threads = RunKvc(
      "compress --server=localhost:1 --input=a --output=b --method=knorm "
      "--keep=0.5 --threads=2");
  EXPECT_EQ(threads.exit_code, 2);
  EXPECT_THAT(threads.output, HasSubstr("--threads applies to --local only"));
}

TEST(KvcToolTest, TransportAndForwardingFlags) {
  const std::string base =
      "compress --server=localhost:1 --input=a --output=b --method=knorm --keep=0.5 ";
  ToolRun bogus = RunKvc(base + "--transport=bogus");
  EXPECT_EQ(bogus.exit_code, 2) << bogus.output;
  EXPECT_THAT(bogus.output, HasSubstr("--transport=bogus: expected inline, cuda_ipc or nccl"));

  ToolRun local =
      RunKvc("compress --local --input=a --output=b --method=knorm --keep=0.5 --transport=nccl");
  EXPECT_EQ(local.exit_code, 2) << local.output;
  EXPECT_THAT(local.output, HasSubstr("--transport applies to --server only"));

  ToolRun forward_with_output = RunKvc(base + "--forward-channel=0123");
  EXPECT_EQ(forward_with_output.exit_code, 2) << forward_with_output.output;
  EXPECT_THAT(forward_with_output.output, HasSubstr("--output is not written"));

#if !KVC_HAVE_CLIENT_CUDA
  // Builds without CUDA know the GPU transports but cannot use them.
  ToolRun ipc = RunKvc(base + "--transport=cuda_ipc");
  EXPECT_EQ(ipc.exit_code, 1) << ipc.output;
  EXPECT_THAT(ipc.output, HasSubstr("UNIMPLEMENTED: --transport=cuda_ipc: this kvc was built "
                                    "without CUDA"));
#endif
}

TEST(KvcToolTest, RuntimeErrorsNameTheStatusCode) {
  ToolRun missing =
      RunKvc("compress --local --input=" + Scratch("missing.safetensors") +
             " --output=" + Scratch("never.safetensors") + " --method=knorm --keep=0.5");
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.output, HasSubstr("kvc: error: NOT_FOUND"));
  EXPECT_THAT(missing.output, HasSubstr("missing.safetensors"));

  ToolRun unreachable = RunKvc("info --server=127.0.0.1:1 --deadline=5");
  EXPECT_EQ(unreachable.exit_code, 1);
  EXPECT_THAT(unreachable.output,
              ::testing::AnyOf(HasSubstr("UNAVAILABLE"), HasSubstr("DEADLINE_EXCEEDED")));
}

TEST(KvcToolTest, SynthThenCompressLocally) {
  const std::string input = Scratch("synth.safetensors");
  const std::string output = Scratch("out.safetensors");
  ToolRun synth = RunKvc("synth --output " + input +
                         " --layers 2 --kv-heads 2 --query-heads 4 --head-dim 32 --tokens 200 "
                         "--window 16 --dtype fp16 --seed 5");
  ASSERT_EQ(synth.exit_code, 0) << synth.output;
  auto cache = ReadCacheInput(input);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(cache->geometry.num_layers, 2);
  EXPECT_EQ(cache->geometry.num_query_heads, 4);
  EXPECT_EQ(cache->geometry.dtype, DType::kFloat16);
  EXPECT_EQ(cache->shape.num_tokens, 200);
  EXPECT_EQ(cache->shape.num_window_queries, 16);

  ToolRun compress = RunKvc("compress --local --input " + input + " --output " + output +
                            " --method knorm --keep-tokens 50 --threads 1");
  ASSERT_EQ(compress.exit_code, 0) << compress.output;
  EXPECT_THAT(compress.output, HasSubstr("attn_mass"));
  EXPECT_THAT(compress.output, HasSubstr("total"));
  auto result = ReadCompressedCache(output);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->metadata.at("method"), "knorm");
  EXPECT_EQ(result->metadata.at("tokens_kept"), "200");  // 2 layers × 2 heads × 50
  EXPECT_EQ(result->metadata.at("mode"), "local");
  for (const LayerResult& layer : result->layers) {
    EXPECT_THAT(layer.kept, ::testing::ElementsAre(50, 50));
  }
}

}  // namespace
}  // namespace kvcompress
