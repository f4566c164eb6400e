#include "tools/flags.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"

namespace mmdit {
namespace {

constexpr char kUsagePayload[] = "type.mmdit.dev/usage-error";

}  // namespace

absl::Status UsageError(absl::string_view message) {
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kUsagePayload, absl::Cord("1"));
  return status;
}

bool IsUsageError(const absl::Status& status) { return status.GetPayload(kUsagePayload).has_value(); }

std::set<std::string> FlagNames(absl::Span<const FlagSpec> specs) {
  std::set<std::string> names;
  for (const FlagSpec& spec : specs) names.insert(spec.name);
  return names;
}

std::string EnvName(const std::string& prefix, const std::string& flag) {
  std::string name = prefix + flag;
  for (char& c : name) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return name;
}

std::string FlagUsage(absl::Span<const FlagSpec> specs, const std::string& env_prefix) {
  std::vector<std::string> heads;
  size_t width = 0;
  for (const FlagSpec& spec : specs) {
    heads.push_back(absl::StrCat("  --", spec.name, *spec.value != '\0' ? " " : "", spec.value));
    width = std::max(width, heads.back().size());
  }
  std::string usage;
  for (size_t i = 0; i < specs.size(); ++i) {
    std::string help = specs[i].help;
    if (!env_prefix.empty()) absl::StrAppend(&help, " [", EnvName(env_prefix, specs[i].name), "]");
    absl::StrAppend(&usage, heads[i], std::string(width + 2 - heads[i].size(), ' '));
    // Wraps at spaces so that lines stay within 110 columns.
    size_t column = width + 2;
    for (absl::string_view word : absl::StrSplit(help, ' ', absl::SkipEmpty())) {
      if (column > width + 2 && column + 1 + word.size() > 110) {
        absl::StrAppend(&usage, "\n", std::string(width + 2, ' '));
        column = width + 2;
      } else if (column > width + 2) {
        usage += ' ';
        ++column;
      }
      absl::StrAppend(&usage, word);
      column += word.size();
    }
    usage += '\n';
  }
  return usage;
}

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args, const std::set<std::string>& known) {
  Flags flags;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0) return UsageError(absl::StrCat("unexpected argument '", arg, "'"));
    std::string name = arg.substr(2), value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return UsageError(absl::StrCat("flag --", name, " needs a value"));
    }
    if (!known.contains(name)) return UsageError(absl::StrCat("unknown flag --", name));
    flags.values_[name] = value;
  }
  return flags;
}

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args, const std::set<std::string>& known,
                                   const std::string& env_prefix, const char* const* environment) {
  std::map<std::string, std::string> by_env_name;
  for (const std::string& name : known) by_env_name[EnvName(env_prefix, name)] = name;
  Flags from_environment;
  for (const char* const* entry = environment; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string text = *entry;
    const size_t eq = text.find('=');
    if (eq == std::string::npos) continue;
    if (const auto it = by_env_name.find(text.substr(0, eq)); it != by_env_name.end()) {
      from_environment.values_[it->second] = text.substr(eq + 1);
    }
  }
  ASSIGN_OR_RETURN(Flags flags, Parse(args, known));
  flags.values_.merge(from_environment.values_);  // keeps the command line's value on a clash
  return flags;
}

std::string Flags::String(const std::string& name, const std::string& fallback) const {
  const auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

absl::StatusOr<std::string> Flags::RequiredString(const std::string& name) const {
  if (!Has(name)) return UsageError(absl::StrCat("missing required flag --", name));
  return values_.at(name);
}

absl::StatusOr<int64_t> Flags::Int(const std::string& name, int64_t fallback) const {
  if (!Has(name)) return fallback;
  int64_t value;
  if (!absl::SimpleAtoi(values_.at(name), &value)) {
    return UsageError(absl::StrCat("--", name, " must be an integer, got '", values_.at(name), "'"));
  }
  return value;
}

absl::StatusOr<int64_t> Flags::RequiredInt(const std::string& name) const {
  if (!Has(name)) return UsageError(absl::StrCat("missing required flag --", name));
  return Int(name, 0);
}

absl::StatusOr<double> Flags::Double(const std::string& name, double fallback) const {
  if (!Has(name)) return fallback;
  double value;
  if (!absl::SimpleAtod(values_.at(name), &value)) {
    return UsageError(absl::StrCat("--", name, " must be a number, got '", values_.at(name), "'"));
  }
  return value;
}

absl::StatusOr<bool> Flags::Bool(const std::string& name, bool fallback) const {
  if (!Has(name)) return fallback;
  if (values_.at(name) == "true") return true;
  if (values_.at(name) == "false") return false;
  return UsageError(absl::StrCat("--", name, " must be true or false, got '", values_.at(name), "'"));
}

absl::StatusOr<std::vector<int64_t>> Flags::IntList(const std::string& name) const {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(String(name), ',')) {
    int64_t value;
    if (!absl::SimpleAtoi(part, &value)) {
      return UsageError(
          absl::StrCat("--", name, " must be comma-separated integers, got '", String(name), "'"));
    }
    out.push_back(value);
  }
  return out;
}

}  // namespace mmdit
