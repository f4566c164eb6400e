// grpc.health.v1.Health, answered from one serving flag that the server flips: NOT_SERVING
// until the model is loaded and warmed up, SERVING while it takes requests, NOT_SERVING
// again once it drains. (gRPC's built-in service starts out SERVING, which would announce
// readiness for a moment before the model is there.)
// The flag covers the whole server ("") and mmdit.v1.Denoiser; other names are
// SERVICE_UNKNOWN (Check: NOT_FOUND, as the protocol asks). Thread-safe.
#pragma once

#include <mutex>
#include <set>

#include "grpc/health/v1/health.grpc.pb.h"

namespace mmdit {

// Must outlive the grpc::Server it is registered with.
class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  void SetServing(bool serving);
  // NOT_SERVING from here on (SetServing no longer changes it); every Watch stream, open or
  // opened later, is sent NOT_SERVING and then finished with OK.
  void Shutdown();
  bool serving() const;

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context, const grpc::health::v1::HealthCheckRequest* request) override;

  class Watcher;

 private:
  friend class Watcher;
  void Forget(Watcher* watcher);

  mutable std::mutex mutex_;
  bool serving_ = false;         // guarded by mutex_
  bool shut_down_ = false;       // guarded by mutex_
  std::set<Watcher*> watchers_;  // guarded by mutex_
};

}  // namespace mmdit
