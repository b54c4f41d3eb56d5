// Host facts for vhost-user: UNIX stream sockets that carry file descriptors
// (SCM_RIGHTS), watched by a uv_poll_t on Node's own loop; MAP_SHARED mappings
// of fds exposed as external ArrayBuffers; eventfd and memfd.
//
// Conventions as in hostfacts.cc: plain functions return a number, negative
// values are -errno (errors are built in JS); argument misuse (wrong types,
// ranges that can never work) throws a TypeError/RangeError at once.
//
// Files: args.h (this: argument and return helpers), socket.cc (UnixSocket,
// unixListen, unixConnect, socketPair), memory.cc (mmapFd, mmapLayout, unmap,
// mappingCount, eventfd, memfd and InitUnixFd), sendfile.cc (sendFileRange).
#pragma once

#include <cerrno>
#include <cmath>
#include <string>

#include "../common.h"

namespace spindle {
namespace unixfd {

inline Napi::Value Ret(Napi::Env env, double v) { return Napi::Number::New(env, v); }
inline Napi::Value Errno(Napi::Env env) { return Ret(env, -(double)errno); }

inline Napi::Value Throw(Napi::Env env, const std::string& msg, bool range = false) {
  if (range)
    Napi::RangeError::New(env, msg).ThrowAsJavaScriptException();
  else
    Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

inline bool IsInt(const Napi::Value& v) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  return std::isfinite(d) && std::floor(d) == d;
}

// An fd argument: an integer in [0, INT32_MAX].
inline bool FdArg(const Napi::CallbackInfo& info, size_t i, const char* fn, int* fd) {
  if (!IsInt(info[i]) || info[i].As<Napi::Number>().DoubleValue() < 0 ||
      info[i].As<Napi::Number>().DoubleValue() > 2147483647.0) {
    Throw(info.Env(), std::string(fn) + ": fd must be a non-negative integer");
    return false;
  }
  *fd = info[i].As<Napi::Number>().Int32Value();
  return true;
}

// Bytes of a Buffer / TypedArray / DataView / ArrayBuffer argument.
inline bool BytesArg(const Napi::Value& v, uint8_t** p, size_t* n) {
  if (v.IsTypedArray()) {
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    *p = (uint8_t*)t.ArrayBuffer().Data() + t.ByteOffset();
    *n = t.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    Napi::DataView d = v.As<Napi::DataView>();
    *p = (uint8_t*)d.ArrayBuffer().Data() + d.ByteOffset();
    *n = d.ByteLength();
    return true;
  }
  if (v.IsArrayBuffer()) {
    Napi::ArrayBuffer a = v.As<Napi::ArrayBuffer>();
    *p = (uint8_t*)a.Data();
    *n = a.ByteLength();
    return true;
  }
  return false;
}

// Each file registers its functions on the addon's exports.
void ExportSockets(Napi::Env env, Napi::Object exports);
void ExportMemory(Napi::Env env, Napi::Object exports);
void ExportSendFile(Napi::Env env, Napi::Object exports);

}  // namespace unixfd
}  // namespace spindle
