// NativeEngine: the JS-facing half shared by both backends.  It owns the
// shared submission/completion areas, turns descriptors into backend requests
// (one native call and one kernel entry per batch), and watches the backend's
// eventfd with a uv_poll_t on Node's own loop, so completions are delivered
// without any completion thread or uv_async hop.
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

#include "common.h"

namespace spindle {
namespace {

constexpr int kDrainRounds = 16;
// An inline write that takes longer than this (the kernel throttled it, or waited
// on the journal) stops inline writes for kInlineBackoffNs: the loop must not stall.
constexpr int64_t kInlineSlowNs = 1000000;
constexpr int64_t kInlineBackoffNs = 100000000;
// Reads are tried inline only while at most this many requests are in flight or in the batch.
constexpr int kInlineReadMaxDepth = 4;
// ... and only up to this size.
constexpr size_t kInlineReadMaxBytes = 64 * 1024;

int64_t NowNs() {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

class NativeEngine : public Napi::ObjectWrap<NativeEngine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeEngine",
                       {InstanceMethod<&NativeEngine::Submit>("submit"),
                        InstanceMethod<&NativeEngine::SubmitExternal>("submitExternal"),
                        InstanceMethod<&NativeEngine::Areas>("areas"),
                        InstanceMethod<&NativeEngine::Enters>("enters"),
                        InstanceMethod<&NativeEngine::Features>("features"),
                        InstanceMethod<&NativeEngine::Destroy>("destroy")});
  }

  // new NativeEngine(kind: 'io_uring'|'threads', entries, threads, onComplete, flags?)
  // flags: EngineFlags bits (common.h).
  NativeEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeEngine>(info) {
    Napi::Env env = info.Env();
    data_ = env.GetInstanceData<AddonData>();
    std::string kind = info[0].As<Napi::String>().Utf8Value();
    entries_ = info[1].As<Napi::Number>().Uint32Value();
    unsigned threads = info[2].As<Napi::Number>().Uint32Value();
    if (entries_ < 1 || entries_ > 32768) {
      Napi::RangeError::New(env, "entries must be in [1, 32768]").ThrowAsJavaScriptException();
      return;
    }
    uint32_t flags = info.Length() > 4 && info[4].IsNumber() ? info[4].As<Napi::Number>().Uint32Value() : 0;
    if (flags & kNoInlineReads) inline_reads_ = false;
    int err = 0;
    backend_.reset(kind == "io_uring" ? CreateUringBackend(entries_, flags, data_->slabs, &err)
                                      : CreatePoolBackend(entries_, threads, &err));
    if (!backend_) {
      Napi::Error e = Napi::Error::New(env, std::string(kind) + " engine: " + strerror(err));
      e.Set("errno", Napi::Number::New(env, -err));
      e.ThrowAsJavaScriptException();
      return;
    }
    data_->backends.push_back(backend_.get());
    callback_ = Napi::Persistent(info[3].As<Napi::Function>());
    async_ctx_.reset(new Napi::AsyncContext(env, "spindle:io"));

    // Areas live in V8-allocated ArrayBuffers whose memory never moves; we
    // keep references so they outlive any JS views.
    Napi::ArrayBuffer sub = Napi::ArrayBuffer::New(env, entries_ * kDescInts * 4);
    Napi::ArrayBuffer iov = Napi::ArrayBuffer::New(env, entries_ * 4 * kIovInts * 4);
    Napi::ArrayBuffer comp = Napi::ArrayBuffer::New(env, entries_ * 2 * 4);
    Napi::ArrayBuffer icomp = Napi::ArrayBuffer::New(env, entries_ * 2 * 4);
    icomp_ = (int32_t*)icomp.Data();
    sub_ = (int32_t*)sub.Data();
    iov_ = (int32_t*)iov.Data();
    comp_ = (int32_t*)comp.Data();
    areas_ = Napi::Persistent(Napi::Object::New(env));
    areas_.Value().Set("sub", sub);
    areas_.Value().Set("iov", iov);
    areas_.Value().Set("comp", comp);
    areas_.Value().Set("icomp", icomp);
    iovs_.resize(entries_);

    uv_loop_t* loop = nullptr;
    napi_get_uv_event_loop(env, &loop);
    poll_ = new uv_poll_t;
    poll_->data = this;
    uv_poll_init(loop, poll_, backend_->EventFd());
    uv_poll_start(poll_, UV_READABLE, OnPoll);
    uv_unref((uv_handle_t*)poll_);  // idle engines never keep the process alive
    napi_add_async_cleanup_hook(env, OnEnvCleanup, this, &cleanup_);
  }

  ~NativeEngine() override { Teardown(); }

 private:
  // submit(count): turn `count` descriptors into requests, one kernel entry.
  Napi::Value Submit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!backend_) return Gone(env);
    uint32_t count = info[0].As<Napi::Number>().Uint32Value();
    if (count > entries_) count = entries_;
    const std::vector<Slab>& slabs = data_->slabs;
    uint32_t iov_cap = entries_ * 4;
    uint32_t done_inline = 0;
    batch_ = (int)count;
    for (uint32_t i = 0; i < count; i++) {
      const int32_t* d = sub_ + i * kDescInts;
      Request r;
      bool inl = (d[kOp] & kOpInline) != 0;
      r.op = d[kOp] & ~kOpInline;
      r.id = d[kId];
      r.fd = d[kFd];
      r.off = (uint64_t)((const double*)d)[3];
      r.iov = nullptr;
      r.nseg = 0;
      r.ptr = nullptr;
      r.len = 0;
      r.mode = 0;
      r.flen = 0;
      r.slab = -1;
      if ((uint32_t)r.id >= entries_) return Bad(env, "request id out of range");
      if (r.op == OP_READ || r.op == OP_WRITE) {
        uint32_t s = (uint32_t)d[kSlab], o = (uint32_t)d[kBufOff], l = (uint32_t)d[kLen];
        if (s >= slabs.size() || (uint64_t)o + l > slabs[s].size) return Bad(env, "bad slab ref");
        r.ptr = slabs[s].base + o;
        r.len = l;
        r.slab = (int32_t)s;
      } else if (r.op == OP_READV || r.op == OP_WRITEV) {
        uint32_t first = (uint32_t)d[kSlab], n = (uint32_t)d[kBufOff];
        if ((uint64_t)first + n > iov_cap || n == 0 || n > IOV_MAX) return Bad(env, "bad iov ref");
        std::vector<iovec>& v = iovs_[r.id];
        v.resize(n);
        for (uint32_t k = 0; k < n; k++) {
          const int32_t* t = iov_ + (first + k) * kIovInts;
          uint32_t s = (uint32_t)t[0], o = (uint32_t)t[1], l = (uint32_t)t[2];
          if (s >= slabs.size() || (uint64_t)o + l > slabs[s].size) return Bad(env, "bad slab ref");
          v[k].iov_base = slabs[s].base + o;
          v[k].iov_len = l;
        }
        r.iov = v.data();
        r.nseg = (int)n;
      } else if (r.op == OP_FALLOCATE) {
        r.mode = d[kSlab];
        r.flen = (uint64_t)((const double*)d)[2];
      }
      if (inl && TryInline(r, icomp_ + 2 * done_inline)) {
        done_inline++;
        continue;
      }
      if (!backend_->Prepare(r)) return Bad(env, "submission queue full");
      inflight_++;
    }
    backend_->Flush();
    if (inflight_ > 0) uv_ref((uv_handle_t*)poll_);
    // The writes done inline: their (id, result) pairs are in `icomp`.
    return Napi::Number::New(env, done_inline);
  }

  // A write to a page-cached file costs a few microseconds in the kernel, far less
  // than a trip through io_uring's workers (ext4 cannot do buffered writes without
  // blocking, so io_uring always hands them to a worker thread) or the thread pool.
  // Such writes run here, unless a recent one was slow.  A read runs here only if
  // the page cache has all of it (RWF_NOWAIT): then it costs a copy, and saves the
  // completion's trip through the ring, the eventfd and a loop iteration.
  bool TryInline(const Request& r, int32_t* out) {
    if (r.op == OP_READ || r.op == OP_READV) return TryInlineRead(r, out);
    if (r.op != OP_WRITE && r.op != OP_WRITEV) return false;
    int64_t t0 = NowNs();
    if (t0 < inline_off_until_) return false;
    ssize_t n = r.op == OP_WRITE ? pwrite(r.fd, r.ptr, r.len, (off_t)r.off)
                                 : pwritev(r.fd, r.iov, r.nseg, (off_t)r.off);
    int64_t t1 = NowNs();
    inline_writes_++;
    if (t1 - t0 > kInlineSlowNs) {
      inline_off_until_ = t1 + kInlineBackoffNs;
      inline_backoffs_++;
    }
    out[0] = r.id;
    out[1] = n < 0 ? -errno : (int32_t)n;
    return true;
  }

  bool TryInlineRead(const Request& r, int32_t* out) {
    // Only at low depth: a deep batch costs one kernel entry in the ring, but one
    // syscall per request here.
    if (!inline_reads_ || inflight_ + batch_ > kInlineReadMaxDepth) return false;
    iovec one{r.ptr, r.len};
    const iovec* v = r.op == OP_READ ? &one : r.iov;
    int nv = r.op == OP_READ ? 1 : r.nseg;
    size_t want = 0;
    for (int i = 0; i < nv; i++) want += v[i].iov_len;
    // A large copy is better left to the ring, whose workers run it beside this thread.
    if (want > kInlineReadMaxBytes) return false;
    ssize_t n = preadv2(r.fd, v, nv, (off_t)r.off, RWF_NOWAIT);
    if (n < 0) {
      if (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS) inline_reads_ = false;  // not here
      return false;  // EAGAIN: not all cached; the ring does it
    }
    // Short: end of file, or only part of it cached.  The ring reads it again and
    // tells which.
    if ((size_t)n < want) return false;
    inline_reads_done_++;
    out[0] = r.id;
    out[1] = (int32_t)n;
    return true;
  }

  // submitExternal(op, id, fd, offset, bufs: ArrayBufferView[]): the slow path
  // for memory outside the slabs.  The JS side holds the views until
  // completion, which keeps their backing stores alive.
  Napi::Value SubmitExternal(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!backend_) return Gone(env);
    Request r{};
    batch_ = 1;
    r.slab = -1;
    r.op = info[0].As<Napi::Number>().Int32Value();
    bool inl = (r.op & kOpInline) != 0;
    r.op &= ~kOpInline;
    r.id = info[1].As<Napi::Number>().Int32Value();
    r.fd = info[2].As<Napi::Number>().Int32Value();
    r.off = (uint64_t)info[3].As<Napi::Number>().DoubleValue();
    if ((uint32_t)r.id >= entries_) return Bad(env, "request id out of range");
    Napi::Array bufs = info[4].As<Napi::Array>();
    uint32_t n = bufs.Length();
    if (n == 0 || n > IOV_MAX) return Bad(env, "bad segment count");
    std::vector<iovec>& v = iovs_[r.id];
    v.resize(n);
    for (uint32_t k = 0; k < n; k++) {
      napi_value el;
      napi_get_element(env, bufs, k, &el);
      bool ok = false;
      napi_is_typedarray(env, el, &ok);
      if (!ok) return Bad(env, "segment is not a typed array");
      napi_typedarray_type type;
      size_t length = 0;
      void* p = nullptr;
      napi_get_typedarray_info(env, el, &type, &length, &p, nullptr, nullptr);
      if (type != napi_uint8_array && type != napi_int8_array &&
          type != napi_uint8_clamped_array)
        return Bad(env, "segment must be a Uint8Array");
      v[k].iov_base = p;
      v[k].iov_len = length;
    }
    r.op = (r.op == OP_READ || r.op == OP_READV) ? OP_READV : OP_WRITEV;
    r.iov = v.data();
    r.nseg = (int)n;
    int32_t res[2];
    // Done inline: the result (the JS side delivers it from its next flush).
    if (inl && TryInline(r, res)) return Napi::Number::New(env, res[1]);
    if (!backend_->Prepare(r)) return Bad(env, "submission queue full");
    inflight_++;
    uv_ref((uv_handle_t*)poll_);
    return env.Undefined();
  }

  Napi::Value Areas(const Napi::CallbackInfo& info) { return areas_.Value(); }

  Napi::Value Enters(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), backend_ ? (double)backend_->enters : last_enters_);
  }

  // features() -> [fixedRequests, setupFlags, fixedSlots, inlineWrites, inlineBackoffs]
  Napi::Value Features(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint32_t setup = 0, slots = 0;
    if (backend_) backend_->Features(&setup, &slots);
    Napi::Array out = Napi::Array::New(env, 5);
    out.Set(0u, Napi::Number::New(env, backend_ ? (double)backend_->fixed : last_fixed_));
    out.Set(1u, Napi::Number::New(env, setup));
    out.Set(2u, Napi::Number::New(env, slots));
    out.Set(3u, Napi::Number::New(env, inline_writes_));
    out.Set(4u, Napi::Number::New(env, inline_backoffs_));
    return out;
  }

  void ForgetBackend() {
    auto& v = data_->backends;
    for (size_t i = 0; i < v.size(); i++) {
      if (v[i] == backend_.get()) {
        v.erase(v.begin() + i);
        break;
      }
    }
  }

  // destroy(): wait for in-flight I/O (so no buffer is touched afterwards),
  // stop the backend and return the outstanding completions as an Int32Array
  // of (id, result) pairs for the JS side to deliver.
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<int32_t> rest = Teardown();
    Napi::Int32Array out = Napi::Int32Array::New(env, rest.size());
    if (!rest.empty()) memcpy(out.Data(), rest.data(), rest.size() * 4);
    return out;
  }

  std::vector<int32_t> Teardown() {
    std::vector<int32_t> rest;
    if (!backend_) return rest;
    backend_->Shutdown(inflight_);
    rest.resize(2 * (size_t)(inflight_ > 0 ? inflight_ : 0));
    if (!rest.empty()) rest.resize(2 * backend_->Reap(rest.data(), inflight_));
    last_enters_ = (double)backend_->enters;
    last_fixed_ = (double)backend_->fixed;
    inflight_ = 0;
    ForgetBackend();
    backend_.reset();
    if (poll_) {
      uv_close((uv_handle_t*)poll_, [](uv_handle_t* h) { delete (uv_poll_t*)h; });
      poll_ = nullptr;
    }
    if (cleanup_) {
      napi_remove_async_cleanup_hook(cleanup_);
      cleanup_ = nullptr;
    }
    callback_.Reset();
    areas_.Reset();
    // async_ctx_ stays until the destructor: destroy() may run inside the
    // MakeCallback that uses it.
    return rest;
  }

  static void OnEnvCleanup(napi_async_cleanup_hook_handle handle, void* arg) {
    NativeEngine* self = (NativeEngine*)arg;
    self->cleanup_ = nullptr;
    if (self->backend_) {
      self->backend_->Shutdown(self->inflight_);
      self->ForgetBackend();
      self->backend_.reset();
    }
    if (!self->poll_) {
      napi_remove_async_cleanup_hook(handle);
      return;
    }
    uv_poll_t* p = self->poll_;
    self->poll_ = nullptr;
    p->data = handle;  // the close callback finishes the async hook
    uv_close((uv_handle_t*)p, [](uv_handle_t* h) {
      napi_async_cleanup_hook_handle hh = (napi_async_cleanup_hook_handle)h->data;
      delete (uv_poll_t*)h;
      napi_remove_async_cleanup_hook(hh);
    });
  }

  static void OnPoll(uv_poll_t* h, int status, int events) {
    ((NativeEngine*)h->data)->Drain();
  }

  void Drain() {
    if (!backend_) return;
    uint64_t v;
    ssize_t rd = read(backend_->EventFd(), &v, sizeof v);  // clear readiness
    (void)rd;
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    // Several rounds per wakeup: completions that the callback's own
    // submissions produce (page-cache reads complete inside the submit) are
    // picked up without another trip through epoll, yet the loop cannot
    // starve timers and other handles.  16 rather than 4 rounds: +9% at
    // depth 1, where each round is one request (~3 us); no change at depth 64.
    for (int round = 0; round < kDrainRounds && backend_; round++) {
      int n = backend_->Reap(comp_, (int)entries_);
      if (n == 0) break;
      inflight_ -= n;
      napi_value arg = Napi::Number::New(env, n);
      // MakeCallback: microtasks (the next batch's flush) run right after.
      callback_.MakeCallback(env.Global(), {arg}, *async_ctx_);
      if (env.IsExceptionPending()) {
        Napi::Error e = env.GetAndClearPendingException();
        napi_fatal_exception(env, e.Value());
      }
    }
    if (backend_ && inflight_ == 0) uv_unref((uv_handle_t*)poll_);
  }

  Napi::Value Bad(Napi::Env env, const char* what) {
    Napi::Error::New(env, std::string("spindle native engine: ") + what)
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Value Gone(Napi::Env env) { return Bad(env, "engine destroyed"); }

  AddonData* data_ = nullptr;
  uint32_t entries_ = 0;
  std::unique_ptr<Backend> backend_;
  Napi::FunctionReference callback_;
  std::unique_ptr<Napi::AsyncContext> async_ctx_;
  Napi::ObjectReference areas_;
  int32_t *sub_ = nullptr, *iov_ = nullptr, *comp_ = nullptr, *icomp_ = nullptr;
  bool inline_reads_ = true;
  int batch_ = 0;  // requests in the submit() being decoded (1 for submitExternal)
  uint64_t inline_reads_done_ = 0;
  int64_t inline_off_until_ = 0;
  double inline_writes_ = 0, inline_backoffs_ = 0;
  std::vector<std::vector<iovec>> iovs_;  // per request id, reused
  int inflight_ = 0;
  double last_enters_ = 0, last_fixed_ = 0;
  uv_poll_t* poll_ = nullptr;
  napi_async_cleanup_hook_handle cleanup_ = nullptr;
};

}  // namespace

void InitEngine(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeEngine", NativeEngine::Define(env));
}

}  // namespace spindle
