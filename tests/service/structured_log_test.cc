#include "service/structured_log.h"

#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

TEST(StructuredLogTest, LineStartsWithTimeAndEventThenTheFields) {
  const std::string line = StructuredLog::FormatLine(
      "compress", {{"request_id", "r-1"}, {"tokens_in", 4096}, {"ok", true}}, 1714564800123456);
  const nlohmann::json parsed = nlohmann::json::parse(line);
  EXPECT_EQ(parsed["ts"], "2024-05-01T12:00:00.123456Z");
  EXPECT_EQ(parsed["event"], "compress");
  EXPECT_EQ(parsed["request_id"], "r-1");
  EXPECT_EQ(parsed["tokens_in"], 4096);
  EXPECT_EQ(parsed["ok"], true);
  EXPECT_EQ(line.rfind(R"({"ts":"2024-05-01T12:00:00.123456Z","event":"compress",)", 0), 0u)
      << line;
}

TEST(StructuredLogTest, FieldsCannotOverrideTimeOrEvent) {
  const nlohmann::json parsed = nlohmann::json::parse(
      StructuredLog::FormatLine("start", {{"event", "forged"}, {"ts", "then"}}, 0));
  EXPECT_EQ(parsed["event"], "start");
  EXPECT_EQ(parsed["ts"], "1970-01-01T00:00:00.000000Z");
}

TEST(StructuredLogTest, ClientTextIsEscapedAndStaysOnOneLine) {
  // A request id is client-chosen: quotes and newlines must not forge fields or lines, and
  // invalid UTF-8 must not throw.
  const std::string hostile = "a\"b\nc\\d\xff\xfe";
  const std::string line = StructuredLog::FormatLine("compress", {{"request_id", hostile}}, 0);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const nlohmann::json parsed = nlohmann::json::parse(line);
  EXPECT_THAT(parsed["request_id"].get<std::string>(), HasSubstr("a\"b\nc\\d"));
}

TEST(StructuredLogTest, NonObjectFieldsAreKeptUnderValue) {
  const nlohmann::json parsed =
      nlohmann::json::parse(StructuredLog::FormatLine("note", nlohmann::json("text"), 0));
  EXPECT_EQ(parsed["value"], "text");
}

TEST(StructuredLogTest, ConcurrentEmitsWriteWholeLines) {
  std::string written;
  StructuredLog log(
      [&written](absl::string_view line) { written.append(line.data(), line.size()); });
  constexpr int kThreads = 8, kLines = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&log, t] {
      for (int i = 0; i < kLines; ++i) {
        log.Emit("tick", {{"thread", t}, {"i", i}, {"padding", std::string(100, 'x')}});
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  int lines = 0;
  size_t start = 0;
  while (start < written.size()) {
    const size_t end = written.find('\n', start);
    ASSERT_NE(end, std::string::npos) << "last line not terminated";
    const nlohmann::json parsed = nlohmann::json::parse(written.substr(start, end - start));
    EXPECT_EQ(parsed["event"], "tick");
    ++lines;
    start = end + 1;
  }
  EXPECT_EQ(lines, kThreads * kLines);
}

}  // namespace
}  // namespace kvcompress
