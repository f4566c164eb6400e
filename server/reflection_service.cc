#include "server/reflection_service.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

#include <utility>

namespace mmdit {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;

// One stream: read a request, write its answer, read the next, until the client closes its side.
class ReflectionReactor final
    : public grpc::ServerBidiReactor<ReflectionService::Request, ReflectionService::Response> {
 public:
  explicit ReflectionReactor(const ReflectionService& service) : service_(service) { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client is done (or the call was cancelled, in which case the status is moot)
      Finish(grpc::Status::OK);
      return;
    }
    response_ = service_.Answer(request_, files_sent_);
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke while writing a reflection response"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  const ReflectionService& service_;
  ReflectionService::Request request_;
  ReflectionService::Response response_;
  std::set<std::string> files_sent_;
};

void SetError(grpc::StatusCode code, std::string message, ReflectionService::Response& response) {
  response.mutable_error_response()->set_error_code(static_cast<int32_t>(code));
  response.mutable_error_response()->set_error_message(std::move(message));
}

}  // namespace

ReflectionService::ReflectionService(std::vector<std::string> service_names)
    : service_names_(std::move(service_names)), pool_(*google::protobuf::DescriptorPool::generated_pool()) {}

grpc::ServerBidiReactor<ReflectionService::Request, ReflectionService::Response>*
ReflectionService::ServerReflectionInfo(grpc::CallbackServerContext* /*context*/) {
  return new ReflectionReactor(*this);
}

void ReflectionService::AddFile(const FileDescriptor& file, std::set<std::string>& files_sent,
                                Response& response) const {
  files_sent.insert(file.name());
  google::protobuf::FileDescriptorProto proto;
  file.CopyTo(&proto);
  file.CopyJsonNameTo(&proto);
  proto.SerializeToString(response.mutable_file_descriptor_response()->add_file_descriptor_proto());
  for (int i = 0; i < file.dependency_count(); ++i) {
    const FileDescriptor& dependency = *file.dependency(i);
    if (!files_sent.contains(dependency.name())) AddFile(dependency, files_sent, response);
  }
}

ReflectionService::Response ReflectionService::Answer(const Request& request,
                                                      std::set<std::string>& files_sent) const {
  Response response;
  response.set_valid_host(request.host());
  *response.mutable_original_request() = request;
  switch (request.message_request_case()) {
    case Request::kListServices:
      for (const std::string& name : service_names_) {
        response.mutable_list_services_response()->add_service()->set_name(name);
      }
      break;
    case Request::kFileByFilename:
      if (const FileDescriptor* file = pool_.FindFileByName(request.file_by_filename())) {
        AddFile(*file, files_sent, response);
      } else {
        SetError(grpc::StatusCode::NOT_FOUND, "file_by_filename: no file named \"" + request.file_by_filename() + "\"",
                 response);
      }
      break;
    case Request::kFileContainingSymbol:
      if (const FileDescriptor* file = pool_.FindFileContainingSymbol(request.file_containing_symbol())) {
        AddFile(*file, files_sent, response);
      } else {
        SetError(grpc::StatusCode::NOT_FOUND,
                 "file_containing_symbol: no symbol named \"" + request.file_containing_symbol() + "\"", response);
      }
      break;
    case Request::kFileContainingExtension: {
      const auto& asked = request.file_containing_extension();
      const Descriptor* type = pool_.FindMessageTypeByName(asked.containing_type());
      const FieldDescriptor* extension =
          type == nullptr ? nullptr : pool_.FindExtensionByNumber(type, asked.extension_number());
      if (type == nullptr) {
        SetError(grpc::StatusCode::NOT_FOUND,
                 "file_containing_extension.containing_type: no message type named \"" + asked.containing_type() + "\"",
                 response);
      } else if (extension == nullptr) {
        SetError(grpc::StatusCode::NOT_FOUND,
                 "file_containing_extension.extension_number: " + asked.containing_type() + " has no extension " +
                     std::to_string(asked.extension_number()),
                 response);
      } else {
        AddFile(*extension->file(), files_sent, response);
      }
      break;
    }
    case Request::kAllExtensionNumbersOfType: {
      const Descriptor* type = pool_.FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) {
        SetError(grpc::StatusCode::NOT_FOUND,
                 "all_extension_numbers_of_type: no message type named \"" + request.all_extension_numbers_of_type() +
                     "\"",
                 response);
        break;
      }
      std::vector<const FieldDescriptor*> extensions;
      pool_.FindAllExtensions(type, &extensions);
      auto* numbers = response.mutable_all_extension_numbers_response();
      numbers->set_base_type_name(type->full_name());
      for (const FieldDescriptor* extension : extensions) numbers->add_extension_number(extension->number());
      break;
    }
    case Request::MESSAGE_REQUEST_NOT_SET:
      SetError(grpc::StatusCode::INVALID_ARGUMENT,
               "message_request: set one of file_by_filename, file_containing_symbol, file_containing_extension, "
               "all_extension_numbers_of_type, list_services",
               response);
      break;
  }
  return response;
}

}  // namespace mmdit
