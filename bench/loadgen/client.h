// What both load generators (openloop.cc, openstream.cc) do the same way before any load:
// read their "--key value" flags, read the payload file, and open one TCP connection per
// channel.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

namespace loadgen {

using Usage = void (*)(const std::string& why);

// Flags are "--key value" pairs; each key's setter converts its value. A missing value, an
// unknown key, or a value its setter cannot convert (std::sto*'s logic_error) is a usage error
// that names it.
using Setters = std::map<std::string, std::function<void(const std::string&)>>;

// The flags both generators take (defaults as openstream's; openloop opens 4 channels).
struct CommonOptions {
  std::string target = "127.0.0.1:8001";
  std::string method;
  std::string payload;
  double rate = 1000;
  double seconds = 10;
  int64_t deadline_ms = 0;
  int channels = 2;
  int concurrency = 0;
  int max_message_bytes = 8 << 20;
};

inline Setters CommonSetters(CommonOptions& o) {
  return {
      {"--target", [&o](const std::string& v) { o.target = v; }},
      {"--method", [&o](const std::string& v) { o.method = v; }},
      {"--payload", [&o](const std::string& v) { o.payload = v; }},
      {"--rate", [&o](const std::string& v) { o.rate = std::stod(v); }},
      {"--seconds", [&o](const std::string& v) { o.seconds = std::stod(v); }},
      {"--deadline-ms", [&o](const std::string& v) { o.deadline_ms = std::stoll(v); }},
      {"--channels", [&o](const std::string& v) { o.channels = std::stoi(v); }},
      {"--concurrency", [&o](const std::string& v) { o.concurrency = std::stoi(v); }},
      {"--max-message-bytes", [&o](const std::string& v) { o.max_message_bytes = std::stoi(v); }},
  };
}

inline void ReadFlags(int argc, char** argv, Usage usage, const Setters& setters) {
  for (int i = 1; i < argc; i += 2) {
    const std::string key = argv[i];
    if (i + 1 >= argc) usage("missing value for " + key);
    const std::string value = argv[i + 1];
    const auto setter = setters.find(key);
    if (setter == setters.end()) usage("unknown option " + key);
    try {
      setter->second(value);
    } catch (const std::logic_error&) {
      usage("bad value for " + key + ": " + value);
    }
  }
}

inline std::string ReadFile(const std::string& path, Usage usage) {
  std::ifstream in(path, std::ios::binary);
  if (!in) usage("cannot read payload " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Channel ``index`` to ``target``: a distinct argument and a channel-local subchannel pool make
// it a TCP connection of its own. Exits when it cannot connect within 10 s.
inline std::shared_ptr<grpc::Channel> Connect(const std::string& program,
                                              const std::string& target, int index,
                                              int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetInt("grpc.channel_id", index);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
    std::cerr << program << ": cannot connect to " << target << "\n";
    std::exit(1);
  }
  return channel;
}

}  // namespace loadgen
