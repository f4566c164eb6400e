// The project's only macros: early return on error, as absl has internally but
// Debian's Abseil (20220623) does not export.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MMDIT_CONCAT_INNER_(a, b) a##b
#define MMDIT_CONCAT_(a, b) MMDIT_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the caller if not OK.
#define RETURN_IF_ERROR(expr)                      \
  do {                                             \
    ::absl::Status mmdit_status_ = (expr);         \
    if (!mmdit_status_.ok()) return mmdit_status_; \
  } while (false)

// `ASSIGN_OR_RETURN(auto x, Foo());` evaluates Foo() (an absl::StatusOr<T>); on error
// returns its status from the caller, otherwise moves the value into `x`.
#define ASSIGN_OR_RETURN(lhs, expr) ASSIGN_OR_RETURN_IMPL_(MMDIT_CONCAT_(mmdit_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                           \
  if (!statusor.ok()) return statusor.status();     \
  lhs = std::move(statusor).value()
