#include "server/health_service.h"

#include <optional>

namespace mmdit {
namespace {

using grpc::health::v1::HealthCheckResponse;

bool KnownService(const std::string& name) { return name.empty() || name == "mmdit.v1.Denoiser"; }

HealthCheckResponse::ServingStatus StatusOf(bool serving) {
  return serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

}  // namespace

// One Watch stream: writes the status now and after every change, one write in flight at a
// time; ends when the client cancels, or with OK after its last NOT_SERVING once the service
// shuts down (so that the gRPC server's shutdown need not wait for, or cut, open watches).
class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* service, bool known) : service_(service), known_(known) {}

  // Called with the service's mutex held.
  void Update(bool serving) {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_ = known_ ? StatusOf(serving) : HealthCheckResponse::SERVICE_UNKNOWN;
    WriteIfIdleLocked();
  }

  // Called with the service's mutex held: ends the stream once its last status is written.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closing_ = true;
      if (writing_ || pending_) return;  // OnWriteDone finishes it
    }
    FinishOnce(grpc::Status::OK);
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      writing_ = false;
      if (ok && pending_) return WriteIfIdleLocked();
      if (ok && !closing_) return;
    }
    FinishOnce(ok ? grpc::Status::OK : grpc::Status::CANCELLED);
  }
  void OnCancel() override { FinishOnce(grpc::Status::CANCELLED); }
  void OnDone() override {
    service_->Forget(this);
    delete this;
  }

 private:
  void WriteIfIdleLocked() {
    if (writing_ || finished_ || !pending_) return;
    response_.set_status(*pending_);
    pending_.reset();
    writing_ = true;
    StartWrite(&response_);
  }
  // Finish is called without our mutex held: gRPC may run OnDone, which deletes us, soon after.
  void FinishOnce(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(status);
  }

  HealthService* const service_;
  const bool known_;
  std::mutex mutex_;
  HealthCheckResponse response_;  // guarded by mutex_; alive while a write is in flight
  std::optional<HealthCheckResponse::ServingStatus> pending_;
  bool writing_ = false, finished_ = false, closing_ = false;
};

void HealthService::SetServing(bool serving) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (shut_down_) return;
  serving_ = serving;
  for (Watcher* watcher : watchers_) watcher->Update(serving);
}

void HealthService::Shutdown() {
  std::lock_guard<std::mutex> lock(mutex_);
  shut_down_ = true;
  serving_ = false;
  for (Watcher* watcher : watchers_) {
    watcher->Update(false);
    watcher->Close();
  }
}

bool HealthService::serving() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return serving_;
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const grpc::health::v1::HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!KnownService(request->service())) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service " + request->service()));
    return reactor;
  }
  response->set_status(StatusOf(serving()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* context, const grpc::health::v1::HealthCheckRequest* request) {
  auto* watcher = new Watcher(this, KnownService(request->service()));
  std::lock_guard<std::mutex> lock(mutex_);
  watchers_.insert(watcher);
  watcher->Update(serving_);
  if (shut_down_) watcher->Close();  // one NOT_SERVING, then the end of the stream
  return watcher;
}

void HealthService::Forget(Watcher* watcher) {
  std::lock_guard<std::mutex> lock(mutex_);
  watchers_.erase(watcher);
}

}  // namespace mmdit
