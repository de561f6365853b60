#include "service/flags_from_env.h"

#include <algorithm>
#include <cstdlib>

#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvcompress {

std::string EnvironmentVariableFor(absl::string_view prefix, absl::string_view flag_name) {
  return absl::StrCat(prefix, absl::AsciiStrToUpper(flag_name));
}

bool FlagDefinedIn(const absl::CommandLineFlag& flag, absl::string_view path) {
  const std::string file = flag.Filename();
  return file == path || absl::EndsWith(file, absl::StrCat("/", path));
}

absl::StatusOr<std::vector<std::string>> ApplyFlagsFromEnvironment(
    absl::string_view prefix, const std::function<bool(const absl::CommandLineFlag&)>& selected,
    const EnvironmentLookup& getenv) {
  // Sorted by name, so that with several bad variables the first one reported is stable.
  std::vector<absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag != nullptr && !flag->IsRetired() && selected(*flag)) flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(),
            [](const absl::CommandLineFlag* a, const absl::CommandLineFlag* b) {
              return a->Name() < b->Name();
            });

  std::vector<std::string> applied;
  for (absl::CommandLineFlag* flag : flags) {
    const std::string variable = EnvironmentVariableFor(prefix, flag->Name());
    const char* value = getenv ? getenv(variable.c_str()) : std::getenv(variable.c_str());
    if (value == nullptr) continue;
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("environment variable ", variable, "=\"",
                                                     value, "\" (flag --", flag->Name(),
                                                     "): ", error));
    }
    applied.push_back(variable);
  }
  return applied;
}

std::string EnvironmentUsage(absl::string_view prefix) {
  return absl::StrCat("Every flag --name can also be set by the environment variable ", prefix,
                      "NAME (upper case, e.g. ", prefix, "ADDRESS, ", prefix,
                      "TLS_CERT); a flag given on the command line wins over its variable.");
}

}  // namespace kvcompress
