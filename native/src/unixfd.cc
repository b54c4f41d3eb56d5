// Host facts for vhost-user: UNIX stream sockets that carry file descriptors
// (SCM_RIGHTS), watched by a uv_poll_t on Node's own loop; MAP_SHARED mappings
// of fds exposed as external ArrayBuffers; eventfd and memfd.
//
// Conventions as in hostfacts.cc: plain functions return a number, negative
// values are -errno (errors are built in JS); argument misuse (wrong types,
// ranges that can never work) throws a TypeError/RangeError at once.
//
// UnixSocket(fd) adopts a socket fd (a listener or a connection).  start(cb)
// begins watching it for readability; cb(status) runs through MakeCallback
// (microtasks run right after) with 0 when the fd is readable — a listener has
// a connection to accept(), a connection has data, fds or EOF to recvmsg() —
// or with a negative errno when polling failed (polling has then stopped).
// Polling is level-triggered: the callback must drain (accept/recvmsg until
// -EAGAIN) or it is called again.  recvmsg() returning 0 bytes (EOF) stops
// polling, so no callback follows EOF.  close() stops polling and closes the
// fd; no callback runs after close(), not even one already signalled in the
// same loop iteration.
#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace spindle {
namespace {

// The kernel's limit on fds per SCM_RIGHTS message.
constexpr int kMaxFds = 253;
constexpr double kMaxSafe = 9007199254740991.0;  // 2^53 - 1

Napi::Value Ret(Napi::Env env, double v) { return Napi::Number::New(env, v); }
Napi::Value Errno(Napi::Env env) { return Ret(env, -(double)errno); }

Napi::Value Throw(Napi::Env env, const std::string& msg, bool range = false) {
  if (range)
    Napi::RangeError::New(env, msg).ThrowAsJavaScriptException();
  else
    Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

bool IsInt(const Napi::Value& v) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  return std::isfinite(d) && std::floor(d) == d;
}

// An fd argument: an integer in [0, INT32_MAX].
bool FdArg(const Napi::CallbackInfo& info, size_t i, const char* fn, int* fd) {
  if (!IsInt(info[i]) || info[i].As<Napi::Number>().DoubleValue() < 0 ||
      info[i].As<Napi::Number>().DoubleValue() > 2147483647.0) {
    Throw(info.Env(), std::string(fn) + ": fd must be a non-negative integer");
    return false;
  }
  *fd = info[i].As<Napi::Number>().Int32Value();
  return true;
}

// Bytes of a Buffer / TypedArray / DataView / ArrayBuffer argument.
bool BytesArg(const Napi::Value& v, uint8_t** p, size_t* n) {
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

// ---- sockets ----------------------------------------------------------------

bool FillAddr(const std::string& path, sockaddr_un* sa, socklen_t* len) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof sa->sun_path || path.find('\0') != std::string::npos)
    return false;
  memcpy(sa->sun_path, path.data(), path.size());
  *len = (socklen_t)(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return true;
}

// unixListen(path, backlog) -> fd | -errno.  Non-blocking, CLOEXEC; the path
// must not exist (the caller unlinks a stale socket if it wants to).
Napi::Value UnixListen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString() || !IsInt(info[1])) return Throw(env, "unixListen(path, backlog)");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int backlog = info[1].As<Napi::Number>().Int32Value();
  sockaddr_un sa;
  socklen_t len;
  if (!FillAddr(path, &sa, &len)) return Ret(env, -ENAMETOOLONG);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno(env);
  if (bind(fd, (sockaddr*)&sa, len) < 0 || listen(fd, backlog > 0 ? backlog : 16) < 0) {
    int e = errno;
    close(fd);
    return Ret(env, -e);
  }
  return Ret(env, fd);
}

// unixConnect(path) -> fd | -errno.  Non-blocking: a full backlog is -EAGAIN
// rather than a stalled event loop.
Napi::Value UnixConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) return Throw(env, "unixConnect(path)");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  sockaddr_un sa;
  socklen_t len;
  if (!FillAddr(path, &sa, &len)) return Ret(env, -ENAMETOOLONG);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno(env);
  int rc;
  do rc = connect(fd, (sockaddr*)&sa, len); while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int e = errno;
    close(fd);
    return Ret(env, -e);
  }
  return Ret(env, fd);
}

// socketPair() -> [fd, fd] | -errno (AF_UNIX stream, non-blocking, CLOEXEC).
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) return Errno(info.Env());
  Napi::Array a = Napi::Array::New(info.Env(), 2);
  a.Set(0u, Ret(info.Env(), sv[0]));
  a.Set(1u, Ret(info.Env(), sv[1]));
  return a;
}

class UnixSocket : public Napi::ObjectWrap<UnixSocket> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "UnixSocket",
                       {InstanceMethod<&UnixSocket::Start>("start"),
                        InstanceMethod<&UnixSocket::Accept>("accept"),
                        InstanceMethod<&UnixSocket::RecvMsg>("recvmsg"),
                        InstanceMethod<&UnixSocket::SendMsg>("sendmsg"),
                        InstanceMethod<&UnixSocket::SetRef>("setRef"),
                        InstanceMethod<&UnixSocket::SetWatching>("setWatching"),
                        InstanceMethod<&UnixSocket::Close>("close"),
                        InstanceAccessor<&UnixSocket::GetFd>("fd"),
                        InstanceAccessor<&UnixSocket::GetPolling>("polling")});
  }

  // new UnixSocket(fd, eventfd = false): adopts fd (closed by close() or when
  // collected).  It must be a socket, or with `eventfd` an eventfd whose
  // counter is read (reset) natively before each callback, so one callback
  // serves any number of kicks.  It is made non-blocking.
  UnixSocket(const Napi::CallbackInfo& info) : Napi::ObjectWrap<UnixSocket>(info) {
    Napi::Env env = info.Env();
    int fd;
    if (!FdArg(info, 0, "UnixSocket", &fd)) return;
    struct stat st;
    if (fstat(fd, &st) < 0) {
      Napi::Error e = Napi::Error::New(env, std::string("UnixSocket: fd ") + std::to_string(fd) + ": " + strerror(errno));
      e.Set("errno", Ret(env, -errno));
      e.ThrowAsJavaScriptException();
      return;
    }
    eventfd_ = info.Length() > 1 && info[1].ToBoolean();
    if (!eventfd_ && !S_ISSOCK(st.st_mode)) {
      Throw(env, std::string("UnixSocket: fd ") + std::to_string(fd) + " is not a socket");
      return;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    fd_ = fd;
  }

  ~UnixSocket() override {
    held_ = false;  // being finalized: the reference is going away anyway
    Teardown();
  }

 private:
  // start(callback): begin polling; once per object.
  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (fd_ < 0) return Throw(env, "UnixSocket.start: socket is closed");
    if (started_) return Throw(env, "UnixSocket.start: already started (the callback is set once)");
    if (!info[0].IsFunction()) return Throw(env, "UnixSocket.start(callback)");
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) return Throw(env, "UnixSocket.start: no event loop");
    poll_ = new uv_poll_t;
    int rc = uv_poll_init(loop, poll_, fd_);
    if (rc < 0) {
      delete poll_;
      poll_ = nullptr;
      Napi::Error e = Napi::Error::New(env, std::string("UnixSocket.start: ") + uv_strerror(rc));
      e.Set("errno", Ret(env, rc));
      e.ThrowAsJavaScriptException();
      return env.Undefined();
    }
    poll_->data = this;
    started_ = true;
    callback_ = Napi::Persistent(info[0].As<Napi::Function>());
    async_ctx_.reset(new Napi::AsyncContext(env, "spindle:unixsocket"));
    uv_poll_start(poll_, UV_READABLE, OnPoll);
    if (!ref_) uv_unref((uv_handle_t*)poll_);
    polling_ = true;
    Ref();  // a polling socket stays alive without JS references, like a net.Server
    held_ = true;
    napi_add_async_cleanup_hook(env, OnEnvCleanup, this, &cleanup_);
    return env.Undefined();
  }

  // accept() -> fd | -errno (-EAGAIN: none pending).  The fd is non-blocking, CLOEXEC.
  Napi::Value Accept(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (fd_ < 0) return Ret(env, -EBADF);
    int fd;
    do fd = accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC); while (fd < 0 && errno == EINTR);
    return fd < 0 ? Errno(env) : Ret(env, fd);
  }

  // recvmsg(buf, maxFds = 8) -> [bytes, fds[]] | -errno.  bytes === 0 is EOF
  // (polling stops).  Received fds are CLOEXEC and belong to the caller.  If
  // more fds arrived than maxFds the kernel dropped the rest (MSG_CTRUNC):
  // the fds received are closed and -EMSGSIZE is returned (the message is
  // consumed; for vhost-user that is a protocol error).
  Napi::Value RecvMsg(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint8_t* p;
    size_t n;
    if (!BytesArg(info[0], &p, &n)) return Throw(env, "UnixSocket.recvmsg(buf, maxFds?): buf must be a Buffer/TypedArray");
    if (n == 0) return Throw(env, "UnixSocket.recvmsg: buf is empty (0 bytes would look like EOF)", true);
    int maxfds = 8;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      if (!IsInt(info[1])) return Throw(env, "UnixSocket.recvmsg: maxFds must be an integer");
      double m = info[1].As<Napi::Number>().DoubleValue();
      if (m < 0 || m > kMaxFds) return Throw(env, "UnixSocket.recvmsg: maxFds must be in [0, 253]", true);
      maxfds = (int)m;
    }
    if (fd_ < 0) return Ret(env, -EBADF);
    struct iovec iov = {p, n};
    std::vector<char> ctrl(CMSG_SPACE(sizeof(int) * (maxfds > 0 ? maxfds : 1)));
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.data();
    msg.msg_controllen = ctrl.size();
    ssize_t r;
    do r = recvmsg(fd_, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); while (r < 0 && errno == EINTR);
    if (r < 0) return Errno(env);
    std::vector<int> fds;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const int* f = (const int*)CMSG_DATA(c);
      for (size_t i = 0; i < k; i++) {
        int v;
        memcpy(&v, f + i, sizeof v);
        fds.push_back(v);
      }
    }
    if ((msg.msg_flags & MSG_CTRUNC) || (int)fds.size() > maxfds) {
      for (int f : fds) close(f);
      return Ret(env, -EMSGSIZE);
    }
    if (r == 0 && fds.empty()) StopPolling();  // EOF: nothing more will come
    Napi::Array a = Napi::Array::New(env, 2);
    Napi::Array fa = Napi::Array::New(env, fds.size());
    for (size_t i = 0; i < fds.size(); i++) fa.Set((uint32_t)i, Ret(env, fds[i]));
    a.Set(0u, Ret(env, (double)r));
    a.Set(1u, fa);
    return a;
  }

  // sendmsg(buf, fds?) -> bytes sent | -errno (-EAGAIN: socket buffer full).
  // A partial send returns fewer bytes; fds go with the first byte only.
  Napi::Value SendMsg(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint8_t* p;
    size_t n;
    if (!BytesArg(info[0], &p, &n)) return Throw(env, "UnixSocket.sendmsg(buf, fds?): buf must be a Buffer/TypedArray");
    std::vector<int> fds;
    if (info.Length() > 1 && !info[1].IsUndefined() && !info[1].IsNull()) {
      if (!info[1].IsArray()) return Throw(env, "UnixSocket.sendmsg: fds must be an array of fds");
      Napi::Array fa = info[1].As<Napi::Array>();
      if (fa.Length() > (uint32_t)kMaxFds) return Throw(env, "UnixSocket.sendmsg: at most 253 fds per message", true);
      for (uint32_t i = 0; i < fa.Length(); i++) {
        Napi::Value v = fa.Get(i);
        if (!IsInt(v) || v.As<Napi::Number>().DoubleValue() < 0 || v.As<Napi::Number>().DoubleValue() > 2147483647.0)
          return Throw(env, "UnixSocket.sendmsg: fds must be non-negative integers");
        fds.push_back(v.As<Napi::Number>().Int32Value());
      }
    }
    if (n == 0 && !fds.empty()) return Throw(env, "UnixSocket.sendmsg: fds need at least one byte of data", true);
    if (fd_ < 0) return Ret(env, -EBADF);
    struct iovec iov = {p, n};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> ctrl;
    if (!fds.empty()) {
      ctrl.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
      msg.msg_control = ctrl.data();
      msg.msg_controllen = ctrl.size();
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    ssize_t r;
    do r = sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT); while (r < 0 && errno == EINTR);
    return r < 0 ? Errno(env) : Ret(env, (double)r);
  }

  // setRef(bool): whether a polling socket keeps the event loop alive (default true).
  Napi::Value SetRef(const Napi::CallbackInfo& info) {
    ref_ = info[0].ToBoolean();
    if (poll_) {
      if (ref_)
        uv_ref((uv_handle_t*)poll_);
      else
        uv_unref((uv_handle_t*)poll_);
    }
    return info.Env().Undefined();
  }

  // setWatching(bool): stop or restart readiness callbacks without closing the
  // fd (another thread may watch it meanwhile: a vhost-user kick handed to a
  // native worker).  No-op unless polling.
  Napi::Value SetWatching(const Napi::CallbackInfo& info) {
    if (poll_ && polling_) {
      if (info[0].ToBoolean())
        uv_poll_start(poll_, UV_READABLE, OnPoll);
      else
        uv_poll_stop(poll_);
    }
    return info.Env().Undefined();
  }

  // close() -> 0 | -errno; idempotent (a second close returns 0).
  Napi::Value Close(const Napi::CallbackInfo& info) {
    int rc = Teardown();
    return Ret(info.Env(), rc < 0 ? rc : 0);
  }

  Napi::Value GetFd(const Napi::CallbackInfo& info) { return Ret(info.Env(), fd_); }
  Napi::Value GetPolling(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), polling_); }

  void StopPolling() {
    polling_ = false;
    if (poll_) {
      uv_poll_stop(poll_);
      poll_->data = nullptr;
      uv_close((uv_handle_t*)poll_, [](uv_handle_t* h) { delete (uv_poll_t*)h; });
      poll_ = nullptr;
    }
    if (cleanup_) {
      napi_remove_async_cleanup_hook(cleanup_);
      cleanup_ = nullptr;
    }
    // The callback stays referenced until Teardown: StopPolling may run
    // inside it.  Releasing the self-reference may let GC collect us later,
    // never now (we are on the stack of a JS call or of OnPoll's scope).
    if (held_) {
      held_ = false;
      Unref();
    }
  }

  int Teardown() {
    StopPolling();
    callback_.Reset();
    int rc = 0;
    if (fd_ >= 0) {
      rc = close(fd_) < 0 ? -errno : 0;
      fd_ = -1;
    }
    return rc;
  }

  static void OnEnvCleanup(napi_async_cleanup_hook_handle handle, void* arg) {
    UnixSocket* self = (UnixSocket*)arg;
    self->cleanup_ = nullptr;
    self->polling_ = false;
    if (self->fd_ >= 0) {
      close(self->fd_);
      self->fd_ = -1;
    }
    uv_poll_t* p = self->poll_;
    self->poll_ = nullptr;
    if (!p) {
      napi_remove_async_cleanup_hook(handle);
      return;
    }
    uv_poll_stop(p);
    p->data = handle;  // the close callback finishes the async hook
    uv_close((uv_handle_t*)p, [](uv_handle_t* h) {
      napi_async_cleanup_hook_handle hh = (napi_async_cleanup_hook_handle)h->data;
      delete (uv_poll_t*)h;
      napi_remove_async_cleanup_hook(hh);
    });
  }

  static void OnPoll(uv_poll_t* h, int status, int events) {
    UnixSocket* self = (UnixSocket*)h->data;
    if (!self || !self->polling_) return;
    if (status >= 0 && self->eventfd_) {
      uint64_t v;
      ssize_t r;
      do r = read(self->fd_, &v, sizeof v); while (r < 0 && errno == EINTR);
      if (r < 0 && errno == EAGAIN) return;  // spurious wake-up
      if (r != (ssize_t)sizeof v) status = r < 0 ? -errno : -EINVAL;
    }
    self->Fire(status);
  }

  void Fire(int status) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    // A handle on our own wrapper: StopPolling/close() in the callback drop the
    // self-reference, and GC must not collect us before Fire returns.
    Napi::Object keep = Value();
    (void)keep;
    if (status < 0) StopPolling();  // report once, then stay quiet
    if (callback_.IsEmpty()) return;
    // Keep the function alive across the call even if close() resets callback_.
    Napi::Function fn = callback_.Value();
    napi_value arg = Ret(env, status < 0 ? status : 0);
    fn.MakeCallback(env.Global(), {arg}, *async_ctx_);
    if (env.IsExceptionPending()) {
      Napi::Error e = env.GetAndClearPendingException();
      napi_fatal_exception(env, e.Value());
    }
  }

  int fd_ = -1;
  bool eventfd_ = false;
  bool started_ = false;
  bool polling_ = false;
  bool held_ = false;
  bool ref_ = true;
  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference callback_;
  std::unique_ptr<Napi::AsyncContext> async_ctx_;
  napi_async_cleanup_hook_handle cleanup_ = nullptr;
};

// ---- mmap ---------------------------------------------------------------------
// Live mappings by id.  The finalizer hint is the id, never an address: an
// address may be reused by a later mapping after unmap().
struct Mapping {
  uint8_t* base;  // page-aligned start of the mapping
  size_t len;     // whole mapping
  uint8_t* user;  // what the ArrayBuffer exposes
  size_t ulen;
};
std::mutex g_maps_mu;
std::map<uintptr_t, Mapping> g_maps;
uintptr_t g_next_map = 1;

void FinalizeMapping(napi_env, void*, void* hint) {
  Mapping m;
  {
    std::lock_guard<std::mutex> g(g_maps_mu);
    auto it = g_maps.find((uintptr_t)hint);
    if (it == g_maps.end()) return;  // unmapped explicitly
    m = it->second;
    g_maps.erase(it);
  }
  munmap(m.base, m.len);
}

// mmapFd(fd, length, offset, writable) -> ArrayBuffer | -errno.  MAP_SHARED;
// offset need not be page-aligned (the mapping starts at the page below it).
Napi::Value MmapFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, "mmapFd", &fd)) return env.Undefined();
  if (!IsInt(info[1]) || !IsInt(info[2])) return Throw(env, "mmapFd(fd, length, offset, writable): length and offset must be integers");
  double length = info[1].As<Napi::Number>().DoubleValue();
  double offset = info[2].As<Napi::Number>().DoubleValue();
  if (!(length > 0)) return Throw(env, "mmapFd: length must be > 0", true);
  if (offset < 0) return Throw(env, "mmapFd: offset must be >= 0", true);
  if (length > kMaxSafe || offset > kMaxSafe || length + offset > kMaxSafe)
    return Throw(env, "mmapFd: offset + length exceeds 2^53 - 1", true);
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  uint64_t off = (uint64_t)offset, len = (uint64_t)length;
  uint64_t delta = off % page;
  uint64_t total = len + delta;
  if (total > (uint64_t)SIZE_MAX / 2) return Throw(env, "mmapFd: length too large for the address space", true);
  int prot = PROT_READ | (info[3].ToBoolean() ? PROT_WRITE : 0);
  void* p = mmap(nullptr, (size_t)total, prot, MAP_SHARED, fd, (off_t)(off - delta));
  if (p == MAP_FAILED) return Errno(env);
  Mapping m{(uint8_t*)p, (size_t)total, (uint8_t*)p + delta, (size_t)len};
  uintptr_t id;
  {
    std::lock_guard<std::mutex> g(g_maps_mu);
    id = g_next_map++;
    g_maps[id] = m;
  }
  napi_value ab;
  napi_status st = napi_create_external_arraybuffer(env, m.user, m.ulen, FinalizeMapping, (void*)id, &ab);
  if (st != napi_ok) {
    {
      std::lock_guard<std::mutex> g(g_maps_mu);
      g_maps.erase(id);
    }
    munmap(m.base, m.len);
    if (!env.IsExceptionPending()) Napi::Error::New(env, "mmapFd: cannot create an external ArrayBuffer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Value(env, ab);
}

// mmapLayout(length, fds, offsets, gpas, sizes) -> ArrayBuffer | -errno.  One
// reservation of `length` bytes (PROT_NONE, so a stray access faults instead of
// reading anything) with each fds[i] range [offsets[i], +sizes[i]) mapped
// MAP_SHARED read-write at gpas[i] inside it: guest-physical addresses become
// offsets into one buffer.  Everything page-aligned, ranges inside `length`
// (checked by the caller; re-checked here).  Unmapped as a whole.
Napi::Value MmapLayout(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!IsInt(info[0]) || !info[1].IsArray() || !info[2].IsArray() || !info[3].IsArray() || !info[4].IsArray())
    return Throw(env, "mmapLayout(length, fds, offsets, gpas, sizes)");
  Napi::Array fds = info[1].As<Napi::Array>(), offs = info[2].As<Napi::Array>();
  Napi::Array gpas = info[3].As<Napi::Array>(), sizes = info[4].As<Napi::Array>();
  uint32_t n = fds.Length();
  if (offs.Length() != n || gpas.Length() != n || sizes.Length() != n) return Throw(env, "mmapLayout: arrays differ in length", true);
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  double length = info[0].As<Napi::Number>().DoubleValue();
  if (!(length > 0) || length > (double)(SIZE_MAX / 4) || fmod(length, (double)page) != 0)
    return Throw(env, "mmapLayout: length must be a positive multiple of the page size", true);
  size_t total = (size_t)length;
  struct Piece { int fd; uint64_t off, gpa, size; };
  std::vector<Piece> pieces;
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value f = fds[i], o = offs[i], g = gpas[i], z = sizes[i];
    if (!IsInt(f) || !IsInt(o) || !IsInt(g) || !IsInt(z)) return Throw(env, "mmapLayout: entries must be integers", true);
    double fv = f.As<Napi::Number>().DoubleValue(), ov = o.As<Napi::Number>().DoubleValue();
    double gv = g.As<Napi::Number>().DoubleValue(), zv = z.As<Napi::Number>().DoubleValue();
    if (fv < 0 || fv > 2147483647.0 || ov < 0 || ov > kMaxSafe || gv < 0 || !(zv > 0) || gv + zv > length)
      return Throw(env, "mmapLayout: entry out of range", true);
    Piece p{(int)fv, (uint64_t)ov, (uint64_t)gv, (uint64_t)zv};
    if (p.off % page || p.gpa % page || p.size % page) return Throw(env, "mmapLayout: entries must be page-aligned", true);
    pieces.push_back(p);
  }
  void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return Errno(env);
  for (const Piece& p : pieces) {
    void* at = (uint8_t*)base + p.gpa;
    void* r = mmap(at, (size_t)p.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, p.fd, (off_t)p.off);
    if (r == MAP_FAILED) {
      int e = errno;
      munmap(base, total);
      return Ret(env, -e);
    }
  }
  Mapping m{(uint8_t*)base, total, (uint8_t*)base, total};
  uintptr_t id;
  {
    std::lock_guard<std::mutex> g(g_maps_mu);
    id = g_next_map++;
    g_maps[id] = m;
  }
  napi_value ab;
  if (napi_create_external_arraybuffer(env, m.user, m.ulen, FinalizeMapping, (void*)id, &ab) != napi_ok) {
    {
      std::lock_guard<std::mutex> g(g_maps_mu);
      g_maps.erase(id);
    }
    munmap(m.base, m.len);
    if (!env.IsExceptionPending()) Napi::Error::New(env, "mmapLayout: cannot create an external ArrayBuffer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Value(env, ab);
}

// unmap(arrayBuffer) -> 0 | -EINVAL.  Detaches the ArrayBuffer (every view
// becomes length 0, so JS can no longer reach the memory) and then munmaps.
// -EINVAL: not a live mapping from mmapFd (already unmapped, or a plain buffer).
Napi::Value Unmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) return Throw(env, "unmap(arrayBuffer): argument must be the ArrayBuffer from mmapFd");
  Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
  uint8_t* data = (uint8_t*)ab.Data();
  size_t n = ab.ByteLength();
  if (!data) return Ret(env, -EINVAL);
  uintptr_t id = 0;
  {
    std::lock_guard<std::mutex> g(g_maps_mu);
    for (auto& kv : g_maps)
      if (kv.second.user == data && kv.second.ulen == n) { id = kv.first; break; }
  }
  if (!id) return Ret(env, -EINVAL);
  // Detach first: once it succeeds no JS view can touch the pages.
  if (napi_detach_arraybuffer(env, ab) != napi_ok) {
    if (env.IsExceptionPending()) env.GetAndClearPendingException();
    return Ret(env, -EINVAL);
  }
  Mapping m;
  {
    std::lock_guard<std::mutex> g(g_maps_mu);
    auto it = g_maps.find(id);
    if (it == g_maps.end()) return Ret(env, 0);  // the finalizer got there first
    m = it->second;
    g_maps.erase(it);
  }
  munmap(m.base, m.len);
  return Ret(env, 0);
}

// mappingCount() -> live mmapFd mappings (for leak tests).
Napi::Value MappingCount(const Napi::CallbackInfo& info) {
  std::lock_guard<std::mutex> g(g_maps_mu);
  return Ret(info.Env(), (double)g_maps.size());
}

// ---- eventfd / memfd ------------------------------------------------------------

// eventfd(initial, nonblocking) -> fd | -errno (CLOEXEC).
Napi::Value EventFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!IsInt(info[0]) || info[0].As<Napi::Number>().DoubleValue() < 0 ||
      info[0].As<Napi::Number>().DoubleValue() > 4294967295.0)
    return Throw(env, "eventfd(initial, nonblocking): initial must be an integer in [0, 2^32)", true);
  int flags = EFD_CLOEXEC | (info[1].ToBoolean() ? EFD_NONBLOCK : 0);
  int fd = eventfd(info[0].As<Napi::Number>().Uint32Value(), flags);
  return fd < 0 ? Errno(env) : Ret(env, fd);
}

// eventfdWrite(fd, value) -> 0 | -errno (-EAGAIN: counter would overflow, non-blocking).
Napi::Value EventFdWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, "eventfdWrite", &fd)) return env.Undefined();
  if (!IsInt(info[1]) || info[1].As<Napi::Number>().DoubleValue() < 1 || info[1].As<Napi::Number>().DoubleValue() > kMaxSafe)
    return Throw(env, "eventfdWrite(fd, value): value must be an integer in [1, 2^53)", true);
  uint64_t v = (uint64_t)info[1].As<Napi::Number>().DoubleValue();
  ssize_t r;
  do r = write(fd, &v, sizeof v); while (r < 0 && errno == EINTR);
  if (r < 0) return Errno(env);
  return Ret(env, r == sizeof v ? 0 : -EIO);
}

// eventfdRead(fd) -> value (> 0) | -errno (-EAGAIN: counter is 0, non-blocking).
Napi::Value EventFdRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, "eventfdRead", &fd)) return env.Undefined();
  uint64_t v = 0;
  ssize_t r;
  do r = read(fd, &v, sizeof v); while (r < 0 && errno == EINTR);
  if (r < 0) return Errno(env);
  if (r != sizeof v) return Ret(env, -EINVAL);  // not an eventfd
  return Ret(env, (double)v);
}

// memfdCreate(name, size) -> fd | -errno (CLOEXEC, sealing allowed).
Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString() || !IsInt(info[1])) return Throw(env, "memfdCreate(name, size)");
  double size = info[1].As<Napi::Number>().DoubleValue();
  if (size < 0 || size > kMaxSafe) return Throw(env, "memfdCreate: size must be in [0, 2^53)", true);
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name.size() > 249 || name.find('\0') != std::string::npos) return Throw(env, "memfdCreate: name too long or contains NUL", true);
  int fd = (int)syscall(SYS_memfd_create, name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Errno(env);
  int rc;
  do rc = ftruncate(fd, (off_t)size); while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int e = errno;
    close(fd);
    return Ret(env, -e);
  }
  return Ret(env, fd);
}

}  // namespace

void InitUnixFd(Napi::Env env, Napi::Object exports) {
  exports.Set("UnixSocket", UnixSocket::Define(env));
  exports.Set("unixListen", Napi::Function::New(env, UnixListen, "unixListen"));
  exports.Set("unixConnect", Napi::Function::New(env, UnixConnect, "unixConnect"));
  exports.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  exports.Set("mmapFd", Napi::Function::New(env, MmapFd, "mmapFd"));
  exports.Set("mmapLayout", Napi::Function::New(env, MmapLayout, "mmapLayout"));
  exports.Set("unmap", Napi::Function::New(env, Unmap, "unmap"));
  exports.Set("mappingCount", Napi::Function::New(env, MappingCount, "mappingCount"));
  exports.Set("eventfd", Napi::Function::New(env, EventFd, "eventfd"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventFdWrite, "eventfdWrite"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventFdRead, "eventfdRead"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
}

}  // namespace spindle
