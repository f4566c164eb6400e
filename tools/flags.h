// Command-line flags of the form `--name value` or `--name=value`, for the project's tools.
// Each command names the flags it accepts; anything else is an error naming the flag.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace mmdit {

// One flag of a program. A program's flag table is the one list its parser, its usage text
// and its environment names are all built from, so that none can name a flag the others lack.
struct FlagSpec {
  const char* name;
  const char* value;  // shown after the flag: its default, or a placeholder such as FILE
  const char* help;
};

// An InvalidArgument error marked as the command line's fault (a missing, unknown or malformed
// flag): programs exit 2 for it, and 1 for every other error.
absl::Status UsageError(absl::string_view message);
bool IsUsageError(const absl::Status& status);

// The names in `specs`, for Flags::Parse.
std::set<std::string> FlagNames(absl::Span<const FlagSpec> specs);
// `prefix` + `flag` in upper case: ("MMDIT_", "max_queue_size") -> MMDIT_MAX_QUEUE_SIZE.
std::string EnvName(const std::string& prefix, const std::string& flag);
// One line per flag, "  --name VALUE   help", with its environment name when `env_prefix` is
// not empty; long help wraps at the column of the help text.
std::string FlagUsage(absl::Span<const FlagSpec> specs, const std::string& env_prefix = "");

class Flags {
 public:
  // Parses `args` (without the program and command names). Errors: UsageError for an
  // unknown flag, a flag without a value, or a stray positional argument.
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args, const std::set<std::string>& known);

  // The same, with each flag also read from the environment as `env_prefix` + its name in
  // upper case (--max_queue_size: MMDIT_MAX_QUEUE_SIZE); the command line wins. `environment`
  // is main's `environ`: nothing below main reads the environment itself.
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args, const std::set<std::string>& known,
                                     const std::string& env_prefix, const char* const* environment);

  bool Has(const std::string& name) const { return values_.contains(name); }
  // The value, or `fallback` when the flag is absent.
  std::string String(const std::string& name, const std::string& fallback = "") const;
  // Errors: UsageError naming the flag when absent (Required*) or not a number.
  absl::StatusOr<std::string> RequiredString(const std::string& name) const;
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t fallback) const;
  absl::StatusOr<int64_t> RequiredInt(const std::string& name) const;
  absl::StatusOr<double> Double(const std::string& name, double fallback) const;
  // "true" or "false"; anything else is a UsageError naming the flag.
  absl::StatusOr<bool> Bool(const std::string& name, bool fallback) const;
  // "16,128,128" -> {16, 128, 128}.
  absl::StatusOr<std::vector<int64_t>> IntList(const std::string& name) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace mmdit
