// Command-line parsing for `kvc`: flags of a subcommand, and the compression method they
// describe as a v1::MethodSpec (the wire type, so `--server` and `--local` start from the
// same value).
//
// Flags are written `--name=value` or `--name value`; boolean flags take no value
// (`--padded`) or an explicit `--padded=true|false`. Every error is INVALID_ARGUMENT naming
// the flag, the value and what was expected. Pure functions; thread-safe.
#ifndef KVCOMPRESS_CLIENT_METHOD_FLAGS_H_
#define KVCOMPRESS_CLIENT_METHOD_FLAGS_H_

#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvcompress/v1/kvcompress.pb.h"

namespace kvcompress {

struct FlagSpec {
  std::string name;  // without the leading "--"
  bool takes_value = true;
  std::string help;  // one line for usage text, e.g. "RATIO  tokens kept per head / T"
};

// The flags of one subcommand after parsing.
class ParsedFlags final {
 public:
  bool Has(absl::string_view name) const { return values_.count(std::string(name)) > 0; }
  // The raw value; nullopt when the flag was not given. Booleans hold "true" or "false".
  std::optional<std::string> Get(absl::string_view name) const;
  bool GetBool(absl::string_view name) const { return Get(name).value_or("false") == "true"; }
  // Typed accessors: nullopt when absent, INVALID_ARGUMENT when malformed or out of range.
  absl::StatusOr<std::optional<uint32_t>> GetUint(absl::string_view name, uint32_t min,
                                                  uint32_t max) const;
  absl::StatusOr<std::optional<double>> GetDouble(absl::string_view name, double min,
                                                  double max) const;

  const std::map<std::string, std::string>& values() const { return values_; }

 private:
  friend absl::StatusOr<ParsedFlags> ParseFlags(std::span<const std::string> args,
                                                std::span<const FlagSpec> known,
                                                absl::string_view command);
  std::map<std::string, std::string> values_;
};

// Parses `args` (the words after the subcommand). Rejects unknown flags, flags given twice,
// missing values and positional arguments; `command` names the subcommand in messages.
absl::StatusOr<ParsedFlags> ParseFlags(std::span<const std::string> args,
                                       std::span<const FlagSpec> known, absl::string_view command);

// The flags MethodSpecFromFlags reads (for usage text and for ParseFlags).
std::span<const FlagSpec> MethodFlagSpecs();

// Builds the method from flags:
//   --method snapkv|knorm|streaming|observed|tova|keydiff, or a preset: pyramidkv
//     (snapkv + pyramid), adakv (snapkv + adaptive), dynamickv (snapkv + dynamic), kvmerger
//     (snapkv + merge_similar), h2o (observed); explicit stage flags override a preset.
//   --keep RATIO in (0, 1] | --keep-tokens N ≥ 1 (exactly one).
//   snapkv: --window --kernel-size (odd) --pooling avg|max --group-reduction mean|max|sum;
//   observed: --group-reduction; streaming: --sinks.
//   --skip-layers 0,1 --protect-sinks N --protect-recent N
//   --layer-budget uniform|pyramid|dynamic [--beta X | --r-max X --update-interval N]
//   --head-budget uniform|adaptive [--alpha X]
//   --reducer drop|merge_similar|merge_nearest [--similarity-threshold X --sigma X|auto
//     --protect-fraction X --scale-values]
// A stage option for a stage that is not selected (e.g. --pooling with knorm) is an error.
absl::StatusOr<v1::MethodSpec> MethodSpecFromFlags(const ParsedFlags& flags);

// The method as JSON text (proto field names), for file metadata.
std::string MethodSpecToJson(const v1::MethodSpec& spec);

// A short name of the method: the scorer, then the non-default stages,
// e.g. "snapkv", "snapkv+pyramid+adaptive+merge_similar".
std::string MethodName(const v1::MethodSpec& spec);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_METHOD_FLAGS_H_
