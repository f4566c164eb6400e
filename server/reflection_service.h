// grpc.reflection.v1, the reflection protocol's current name, answered from the protobuf
// descriptors compiled into this binary. Debian 12's gRPC (1.51) serves only v1alpha (its
// plugin, which we register too); clients that ask for v1 find it here. Both versions list the
// same services.
#pragma once

#include <set>
#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace google::protobuf {
class DescriptorPool;
class FileDescriptor;
}  // namespace google::protobuf

namespace mmdit {

// Must outlive the grpc::Server it is registered with. Stateless between calls: thread-safe.
class ReflectionService final : public grpc::reflection::v1::ServerReflection::CallbackService {
 public:
  using Request = grpc::reflection::v1::ServerReflectionRequest;
  using Response = grpc::reflection::v1::ServerReflectionResponse;

  // `service_names`: the full names list_services reports, in that order.
  explicit ReflectionService(std::vector<std::string> service_names);

  grpc::ServerBidiReactor<Request, Response>* ServerReflectionInfo(grpc::CallbackServerContext* context) override;

  // The answer to one request. `files_sent` holds the files this stream has already carried, so
  // that a dependency goes to a client once per stream (as gRPC's own v1alpha service does).
  Response Answer(const Request& request, std::set<std::string>& files_sent) const;

 private:
  void AddFile(const google::protobuf::FileDescriptor& file, std::set<std::string>& files_sent,
               Response& response) const;

  std::vector<std::string> service_names_;
  const google::protobuf::DescriptorPool& pool_;
};

}  // namespace mmdit
