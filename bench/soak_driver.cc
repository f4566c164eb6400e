// Soak traffic for bench/soak.sh: open-loop (Poisson) arrivals of mixed Denoise and Generate
// calls, valid, malformed and cancelled, for a fixed time, each on a thread of its own. Every
// REPORT_EVERY seconds a line with the server's resident memory (from /proc/PID/status); at
// the end the calls by kind and status code, as the client saw them, in JSON on the last line.
//   soak_driver TARGET SERVER_PID SECONDS RATE REPORT_EVERY
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <future>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "client/denoiser_client.h"
#include "nlohmann/json.hpp"
#include "proto/tensor_codec.h"

namespace mmdit {
namespace {

using Clock = std::chrono::steady_clock;

int64_t ResidentKb(int pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6));
  }
  return -1;
}

Tensor Random(Shape shape, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Tensor t(std::move(shape));
  for (float& v : t.data) v = normal(rng);
  return t;
}

class Soak {
 public:
  Soak(std::shared_ptr<grpc::Channel> channel, const v1::ModelInfo& model)
      : channel_(std::move(channel)), stub_(v1::Denoiser::NewStub(channel_)), model_(model) {}

  // One call of a kind drawn at random; returns when it is answered.
  void Call(uint32_t seed) {
    std::mt19937 rng(seed);
    const int draw = std::uniform_int_distribution<int>(0, 99)(rng);
    if (draw < 45) return Denoise("denoise", rng, Spoil::kNone);
    if (draw < 55) return Denoise("denoise_malformed", rng, Spoil::kShape);
    if (draw < 60) return Garbage("garbage_body", rng);
    if (draw < 70) return Denoise("denoise_cancelled", rng, Spoil::kCancel);
    if (draw < 90) return Generate("generate", rng, false);
    if (draw < 95) return Generate("generate_cancelled", rng, true);
    return Generate("generate_malformed", rng, false, /*malformed=*/true);
  }

  void Record(const std::string& kind, grpc::StatusCode code, double ms) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++codes_[kind][absl::StatusCodeToString(static_cast<absl::StatusCode>(code))];
    if (code == grpc::StatusCode::OK) ok_ms_[kind].push_back(ms);
  }

  nlohmann::json Report() {
    std::lock_guard<std::mutex> lock(mutex_);
    nlohmann::json report = {{"calls", codes_}};
    for (auto& [kind, values] : ok_ms_) {
      std::sort(values.begin(), values.end());
      report["ok_p99_ms"][kind] = values.empty() ? 0.0 : values[std::min(values.size() - 1, values.size() * 99 / 100)];
      report["ok_p50_ms"][kind] = values.empty() ? 0.0 : values[values.size() / 2];
    }
    return report;
  }

 private:
  enum class Spoil { kNone, kShape, kCancel };

  std::chrono::system_clock::time_point Deadline() const {
    return std::chrono::system_clock::now() + std::chrono::seconds(20);
  }

  void Denoise(const std::string& kind, std::mt19937& rng, Spoil spoil) {
    const int64_t side = 2 * std::uniform_int_distribution<int64_t>(2, 8)(rng);  // 4..16, patch 2
    const int64_t tokens = std::uniform_int_distribution<int64_t>(1, 77)(rng);
    const Tensor img = Random({1, model_.in_channels(), side, side}, rng);
    const Tensor txt = Random({1, tokens, model_.txt_dim()}, rng);
    const Tensor timestep({1}, {std::uniform_real_distribution<float>(0, 1000)(rng)});
    const Tensor pooled = Random({1, model_.cond_dim()}, rng);
    v1::DenoiseRequest request = MakeDenoiseRequest({img, txt, timestep, pooled}, v1::FP32);
    if (spoil == Spoil::kShape) request.mutable_img_latent()->set_shape(2, side + 1);  // bytes no longer match
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    v1::DenoiseResponse response;
    std::mutex done_mutex;
    std::condition_variable done_cv;
    bool done = false;
    grpc::Status status;
    const auto start = Clock::now();
    stub_->async()->Denoise(&context, &request, &response, [&](grpc::Status s) {
      std::lock_guard<std::mutex> lock(done_mutex);
      status = std::move(s);
      done = true;
      done_cv.notify_one();
    });
    if (spoil == Spoil::kCancel) {
      std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 50)(rng)));
      context.TryCancel();
    }
    std::unique_lock<std::mutex> lock(done_mutex);
    done_cv.wait(lock, [&] { return done; });
    Record(kind, status.error_code(), std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }

  void Garbage(const std::string& kind, std::mt19937& rng) {
    std::string body(std::uniform_int_distribution<int>(1, 300)(rng), '\0');
    for (char& c : body) c = static_cast<char>(rng());
    grpc::GenericStub stub(channel_);
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    grpc::Slice slice(body);
    const grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    std::promise<grpc::Status> answered;
    const auto start = Clock::now();
    stub.UnaryCall(&context, "/mmdit.v1.Denoiser/Denoise", grpc::StubOptions(), &request, &response,
                   [&](grpc::Status status) { answered.set_value(std::move(status)); });
    const grpc::Status status = answered.get_future().get();
    Record(kind, status.error_code(), std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }

  void Generate(const std::string& kind, std::mt19937& rng, bool cancel, bool malformed = false) {
    const int64_t side = 2 * std::uniform_int_distribution<int64_t>(2, 8)(rng);
    const int64_t tokens = std::uniform_int_distribution<int64_t>(1, 77)(rng);
    const Tensor txt = Random({1, tokens, model_.txt_dim()}, rng), pooled = Random({1, model_.cond_dim()}, rng);
    const Tensor negative = Random({1, tokens, model_.txt_dim()}, rng);
    GenerateInputs inputs{.txt_embed = txt, .pooled_text = pooled};
    inputs.negative_txt_embed = TensorView(negative);
    inputs.negative_pooled_text = TensorView(pooled);
    inputs.latent_shape = {model_.in_channels(), side, side};
    inputs.steps = std::uniform_int_distribution<int32_t>(2, 12)(rng);
    inputs.guidance_scale = 5.0f;
    inputs.seed = rng();
    v1::GenerateRequest request = MakeGenerateRequest(inputs, v1::FP32);
    if (malformed) request.mutable_pooled_text()->mutable_data()->resize(3);
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    const auto start = Clock::now();
    std::unique_ptr<grpc::ClientReader<v1::GenerateProgress>> reader = stub_->Generate(&context, request);
    v1::GenerateProgress progress;
    const int cancel_after = std::uniform_int_distribution<int>(1, 3)(rng);
    for (int read = 0; reader->Read(&progress);) {
      if (cancel && ++read == cancel_after) context.TryCancel();
    }
    const grpc::Status status = reader->Finish();
    Record(kind, status.error_code(), std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Denoiser::Stub> stub_;
  const v1::ModelInfo model_;
  std::mutex mutex_;
  std::map<std::string, std::map<std::string, int64_t>> codes_;  // guarded
  std::map<std::string, std::vector<double>> ok_ms_;             // guarded
};

int Run(const std::string& target, int pid, double seconds, double rate, double report_every) {
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = v1::Denoiser::NewStub(channel);
  v1::GetModelInfoResponse info;
  grpc::ClientContext info_context;
  info_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!stub->GetModelInfo(&info_context, {}, &info).ok()) {
    std::cerr << "soak_driver: GetModelInfo failed\n";
    return 1;
  }
  Soak soak(channel, info.model());
  std::mt19937 rng(1);
  std::exponential_distribution<double> gap(rate);
  constexpr int64_t kMaxInFlight = 2000;
  std::atomic<int64_t> in_flight{0}, sent{0}, answered{0}, skipped{0};
  const Clock::time_point start = Clock::now();
  const Clock::time_point end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  auto next_report = start;
  auto next_arrival = start;
  std::cout << "t_s rss_mb sent answered in_flight\n";
  while (Clock::now() < end) {
    if (Clock::now() >= next_report) {
      std::cout << std::chrono::duration<double>(Clock::now() - start).count() << " " << ResidentKb(pid) / 1024.0
                << " " << sent.load() << " " << answered.load() << " " << in_flight.load() << std::endl;
      next_report += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(report_every));
    }
    next_arrival += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    std::this_thread::sleep_until(next_arrival);
    if (in_flight.load() >= kMaxInFlight) {  // the client's own limit, not the server's answer
      ++skipped;
      continue;
    }
    ++sent;
    ++in_flight;
    std::thread([&, seed = static_cast<uint32_t>(rng())] {
      soak.Call(seed);
      ++answered;
      --in_flight;
    }).detach();
  }
  while (in_flight.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::cout << std::chrono::duration<double>(Clock::now() - start).count() << " " << ResidentKb(pid) / 1024.0 << " "
            << sent.load() << " " << answered.load() << " " << in_flight.load() << std::endl;
  nlohmann::json report = soak.Report();
  report["sent"] = sent.load();
  report["answered"] = answered.load();
  report["skipped_at_client_limit"] = skipped.load();
  std::cout << report.dump() << std::endl;
  return 0;
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: soak_driver TARGET SERVER_PID SECONDS RATE REPORT_EVERY\n";
    return 2;
  }
  return mmdit::Run(argv[1], std::stoi(argv[2]), std::stod(argv[3]), std::stod(argv[4]), std::stod(argv[5]));
}
