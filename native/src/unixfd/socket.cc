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
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "args.h"

namespace spindle {
namespace unixfd {
namespace {

// The kernel's limit on fds per SCM_RIGHTS message.
constexpr int kMaxFds = 253;

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

// setSendBuffer(fd, bytes) -> 0 | -errno: SO_SNDBUF of a socket Node made (an NBD client's).
// The kernel doubles it and caps it at net.core.wmem_max.
Napi::Value SetSendBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!IsInt(info[0]) || !IsInt(info[1])) return Throw(env, "setSendBuffer(fd, bytes)");
  int fd = info[0].As<Napi::Number>().Int32Value();
  double want = info[1].As<Napi::Number>().DoubleValue();
  if (fd < 0 || want < 0 || want > 1073741824.0) return Throw(env, "setSendBuffer: fd or size out of range", true);
  int v = (int)want;
  return setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0 ? Errno(env) : Ret(env, 0);
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

}  // namespace

void ExportSockets(Napi::Env env, Napi::Object exports) {
  exports.Set("UnixSocket", UnixSocket::Define(env));
  exports.Set("unixListen", Napi::Function::New(env, UnixListen, "unixListen"));
  exports.Set("unixConnect", Napi::Function::New(env, UnixConnect, "unixConnect"));
  exports.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  exports.Set("setSendBuffer", Napi::Function::New(env, SetSendBuffer, "setSendBuffer"));
}

}  // namespace unixfd
}  // namespace spindle
