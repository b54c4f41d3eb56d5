// The VhostBlkWorker JS class: validates arguments, owns the Queue objects,
// and hands everything to the Worker thread as commands (see worker.h).
#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../common.h"
#include "worker.h"

namespace spindle {
namespace {

using vhostblk::kIdBytes;
using vhostblk::kMaxQueues;
using vhostblk::kMaxQueueSize;
using vhostblk::kSector;
using vhostblk::Queue;
using vhostblk::Span;
using vhostblk::Worker;

int DupFd(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

class VhostBlkWorker : public Napi::ObjectWrap<VhostBlkWorker> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "VhostBlkWorker",
                       {InstanceMethod<&VhostBlkWorker::SetMemory>("setMemory"),
                        InstanceMethod<&VhostBlkWorker::AddQueue>("addQueue"),
                        InstanceMethod<&VhostBlkWorker::RemoveQueue>("removeQueue"),
                        InstanceMethod<&VhostBlkWorker::SetCallFd>("setCallFd"),
                        InstanceMethod<&VhostBlkWorker::SetWriteCache>("setWriteCache"),
                        InstanceMethod<&VhostBlkWorker::Kick>("kick"),
                        InstanceMethod<&VhostBlkWorker::Pause>("pause"),
                        InstanceMethod<&VhostBlkWorker::Resume>("resume"),
                        InstanceMethod<&VhostBlkWorker::Stats>("stats"),
                        InstanceMethod<&VhostBlkWorker::Destroy>("destroy"),
                        InstanceAccessor<&VhostBlkWorker::GetThreadId>("threadId")});
  }

  VhostBlkWorker(const Napi::CallbackInfo& info) : Napi::ObjectWrap<VhostBlkWorker>(info) {
    Napi::Env env = info.Env();
    worker_.reset(new Worker());
    int r = worker_->Start();
    if (r < 0) {
      worker_.reset();
      Napi::Error e = Napi::Error::New(env, std::string("VhostBlkWorker: ") + strerror(-r));
      e.Set("errno", Napi::Number::New(env, r));
      e.ThrowAsJavaScriptException();
      return;
    }
    queues_.assign(kMaxQueues, nullptr);
    env_ = env;
    napi_add_env_cleanup_hook(env, OnEnvCleanup, this);
    hook_ = true;
  }

  ~VhostBlkWorker() override { Teardown(); }

 private:
  static void OnEnvCleanup(void* arg) {
    VhostBlkWorker* self = (VhostBlkWorker*)arg;
    self->hook_ = false;  // running: must not be removed
    self->Teardown();
  }

  void Teardown() {
    if (!worker_) return;
    worker_->Stop();
    worker_.reset();
    for (Queue*& q : queues_) {
      delete q;
      q = nullptr;
    }
    attached_ = 0;
    if (hook_) {
      napi_remove_env_cleanup_hook(env_, OnEnvCleanup, this);
      hook_ = false;
    }
    // memory_ (the layout reference) is released by the ObjectReference
    // destructor or by destroy(); never from an env cleanup hook.
  }

  Napi::Value Fail(Napi::Env env, const std::string& msg, bool range = false) {
    std::string m = "VhostBlkWorker: " + msg;
    if (range)
      Napi::RangeError::New(env, m).ThrowAsJavaScriptException();
    else
      Napi::Error::New(env, m).ThrowAsJavaScriptException();
    return env.Undefined();
  }

  static bool Int(const Napi::Value& v, double lo, double hi, double* out) {
    if (!v.IsNumber()) return false;
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= lo && d <= hi) || std::floor(d) != d) return false;
    *out = d;
    return true;
  }

  Queue* Lookup(const Napi::CallbackInfo& info) {
    double idx;
    if (!worker_) return Fail(info.Env(), "destroyed"), nullptr;
    if (!Int(info[0], 0, kMaxQueues - 1, &idx)) return Fail(info.Env(), "queue index out of range", true), nullptr;
    Queue* q = queues_[(uint32_t)idx];
    if (!q) return Fail(info.Env(), "queue " + std::to_string((uint32_t)idx) + " is not attached"), nullptr;
    return q;
  }

  // [start, end) spans inside a layout of `size` bytes, or an exception.
  bool ParseSpans(Napi::Env env, const Napi::Value& v, double size, std::vector<Span>* out) {
    if (!v.IsArray()) return Fail(env, "spans must be [start, end] pairs"), false;
    Napi::Array arr = v.As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Value e = arr[i];
      if (!e.IsArray()) return Fail(env, "spans must be [start, end] pairs"), false;
      Napi::Array p = e.As<Napi::Array>();
      double s, t;
      if (p.Length() != 2 || !Int(p[0u], 0, size, &s) || !Int(p[1u], 0, size, &t) || !(s < t))
        return Fail(env, "span " + std::to_string(i) + " is not inside the layout", true), false;
      out->push_back({(uint64_t)s, (uint64_t)t});
    }
    return true;
  }

  // setMemory(layout: ArrayBuffer, spans: [start, end][]): the memory of queues
  // added without their own.
  Napi::Value SetMemory(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!worker_) return Fail(env, "destroyed");
    if (attached_ > 0) return Fail(env, "setMemory while queues are attached");
    if (!info[0].IsArrayBuffer() || !info[1].IsArray()) return Fail(env, "setMemory(layout, spans)");
    Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
    std::vector<Span> spans;
    if (!ParseSpans(env, info[1], (double)ab.ByteLength(), &spans)) return env.Undefined();
    if (ab.ByteLength() == 0 || ab.Data() == nullptr) spans.clear();
    spans_ = spans;
    mem_ = (uint8_t*)ab.Data();
    memory_ = Napi::Persistent(Napi::Object(env, ab));  // keeps the mapping alive
    has_memory_ = !spans.empty();
    return env.Undefined();
  }

  // addQueue(index, {num, desc, avail, used, lastAvail, usedIdx, eventIdx, kickFd,
  //                  callFd, fd, capacitySectors, readOnly, serial, writeCache})
  Napi::Value AddQueue(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!worker_) return Fail(env, "destroyed");
    double idx;
    if (!Int(info[0], 0, kMaxQueues - 1, &idx)) return Fail(env, "queue index out of range", true);
    if (queues_[(uint32_t)idx]) return Fail(env, "queue " + std::to_string((uint32_t)idx) + " is already attached");
    if (!info[1].IsObject()) return Fail(env, "addQueue(index, options)");
    Napi::Object o = info[1].As<Napi::Object>();
    // The queue's own memory ({memory, spans}), or the worker's (setMemory).
    Napi::Value mv = o.Get("memory");
    std::vector<Span> qspans;
    uint8_t* qmem;
    Napi::Object qref;
    if (mv.IsArrayBuffer()) {
      Napi::ArrayBuffer ab = mv.As<Napi::ArrayBuffer>();
      if (!ParseSpans(env, o.Get("spans"), (double)ab.ByteLength(), &qspans)) return env.Undefined();
      if (ab.Data() == nullptr || qspans.empty()) return Fail(env, "addQueue: the queue's memory is empty");
      qmem = (uint8_t*)ab.Data();
      qref = ab;
    } else {
      if (!has_memory_) return Fail(env, "addQueue before setMemory");
      qspans = spans_;
      qmem = mem_;
      qref = memory_.Value();
    }
    double num, desc, avail, used, last, uidx, kick, call, fd, cap;
    const double kMax = 9007199254740991.0;
    if (!Int(o.Get("num"), 1, kMaxQueueSize, &num) || ((uint32_t)num & ((uint32_t)num - 1)))
      return Fail(env, "num must be a power of 2 in [1, 32768]", true);
    if (!Int(o.Get("desc"), 0, kMax, &desc) || !Int(o.Get("avail"), 0, kMax, &avail) || !Int(o.Get("used"), 0, kMax, &used))
      return Fail(env, "desc/avail/used must be guest addresses", true);
    if (!Int(o.Get("lastAvail"), 0, 65535, &last) || !Int(o.Get("usedIdx"), 0, 65535, &uidx))
      return Fail(env, "lastAvail/usedIdx must be in [0, 65535]", true);
    if (!Int(o.Get("kickFd"), 0, INT_MAX, &kick) || !Int(o.Get("callFd"), -1, INT_MAX, &call) ||
        !Int(o.Get("fd"), 0, INT_MAX, &fd))
      return Fail(env, "kickFd/fd must be fds, callFd an fd or -1", true);
    if (!Int(o.Get("capacitySectors"), 0, kMax / kSector, &cap)) return Fail(env, "capacitySectors out of range", true);
    std::string serial = o.Get("serial").IsString() ? o.Get("serial").As<Napi::String>().Utf8Value() : "";
    if (serial.size() > kIdBytes) return Fail(env, "serial is longer than 20 bytes", true);

    Queue* q = new Queue();
    q->index = (uint32_t)idx;
    q->mem = qmem;
    q->spans = std::move(qspans);
    q->num = (uint32_t)num;
    q->desc = (uint64_t)desc;
    q->avail = (uint64_t)avail;
    q->used = (uint64_t)used;
    q->last_avail = (uint16_t)last;
    q->used_idx = q->published = (uint16_t)uidx;
    q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16));
    q->event_idx = o.Get("eventIdx").ToBoolean();
    q->read_only = o.Get("readOnly").ToBoolean();
    q->discard = o.Get("discard").IsUndefined() || o.Get("discard").ToBoolean().Value();
    q->write_zeroes = o.Get("writeZeroes").IsUndefined() || o.Get("writeZeroes").ToBoolean().Value();
    q->write_cache.store(o.Get("writeCache").IsUndefined() ? true : o.Get("writeCache").ToBoolean().Value());
    q->capacity = (uint64_t)cap;
    memcpy(q->serial, serial.data(), serial.size());
    q->stamp.assign(q->num, 0);
    q->kick_fd = DupFd((int)kick);
    q->fd = q->kick_fd >= 0 ? DupFd((int)fd) : -1;
    q->call_fd = q->fd >= 0 && call >= 0 ? DupFd((int)call) : -1;
    if (q->kick_fd < 0 || q->fd < 0 || (call >= 0 && q->call_fd < 0)) {
      int e = errno;
      for (int f : {q->kick_fd, q->fd, q->call_fd})
        if (f >= 0) close(f);
      delete q;
      return Fail(env, std::string("addQueue: dup: ") + strerror(e));
    }
    int r = worker_->Command(Worker::kAdd, q, q->index, -1);
    if (r < 0) {
      for (int f : {q->kick_fd, q->fd, q->call_fd})
        if (f >= 0) close(f);
      delete q;
      return Fail(env, std::string("addQueue: epoll: ") + strerror(-r));
    }
    queues_[q->index] = q;
    qmem_[q->index] = Napi::Persistent(qref);  // the mapping outlives the queue
    attached_++;
    return env.Undefined();
  }

  Napi::Object StatsOf(Napi::Env env, Queue* q) {
    Napi::Object o = Napi::Object::New(env);
    uint32_t pos = q->pos.load(std::memory_order_acquire);
    o.Set("lastAvail", (double)(pos & 0xffff));
    o.Set("usedIdx", (double)(pos >> 16));
    o.Set("requests", (double)q->requests.load());
    o.Set("bytesRead", (double)q->bytes_read.load());
    o.Set("bytesWritten", (double)q->bytes_written.load());
    o.Set("errors", (double)q->errors.load());
    o.Set("calls", (double)q->calls.load());
    o.Set("batches", (double)q->batches.load());
    o.Set("busyNs", (double)q->busy_ns.load());
    if (q->broken.load()) {
      std::lock_guard<std::mutex> g(worker_->stats_mu_);
      o.Set("broken", q->why);
    } else {
      o.Set("broken", env.Null());
    }
    return o;
  }

  Napi::Value RemoveQueue(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    worker_->Command(Worker::kRemove, q, q->index, -1);
    Napi::Object o = StatsOf(info.Env(), q);
    queues_[q->index] = nullptr;
    qmem_[q->index].Reset();
    attached_--;
    delete q;
    return o;
  }

  Napi::Value SetCallFd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Queue* q = Lookup(info);
    if (!q) return env.Undefined();
    double fd;
    if (!Int(info[1], -1, INT_MAX, &fd)) return Fail(env, "setCallFd(index, fd | -1)", true);
    int dup = -1;
    if (fd >= 0 && (dup = DupFd((int)fd)) < 0) return Fail(env, std::string("setCallFd: dup: ") + strerror(errno));
    worker_->Command(Worker::kSetCall, q, q->index, dup);
    return env.Undefined();
  }

  Napi::Value SetWriteCache(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    q->write_cache.store(info[1].ToBoolean().Value());
    return info.Env().Undefined();
  }

  // kick(index): as if the driver kicked (the worker's dup of the kick fd).
  Napi::Value Kick(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    uint64_t one = 1;
    ssize_t w = write(q->kick_fd, &one, sizeof one);
    (void)w;
    return info.Env().Undefined();
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    if (!worker_) return Fail(info.Env(), "destroyed");
    worker_->Command(Worker::kPause, nullptr, 0, -1);
    return info.Env().Undefined();
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (!worker_) return Fail(info.Env(), "destroyed");
    worker_->Command(Worker::kResume, nullptr, 0, -1);
    return info.Env().Undefined();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    return StatsOf(info.Env(), q);
  }

  Napi::Value GetThreadId(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), worker_ ? (double)worker_->tid_.load() : 0);
  }

  // destroy(): stops and joins the thread, closes every dup'd fd. Idempotent.
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Teardown();
    memory_.Reset();
    for (auto& r : qmem_) r.Reset();
    has_memory_ = false;
    return info.Env().Undefined();
  }

  std::unique_ptr<Worker> worker_;
  std::vector<Queue*> queues_;  // JS-thread view: attached queues (owned here)
  uint32_t attached_ = 0;
  Napi::ObjectReference memory_;
  std::vector<Span> spans_;  // with memory_: the default memory of new queues
  uint8_t* mem_ = nullptr;
  bool has_memory_ = false;
  std::vector<Napi::ObjectReference> qmem_ = std::vector<Napi::ObjectReference>(kMaxQueues);
  napi_env env_ = nullptr;
  bool hook_ = false;
};

}  // namespace

void InitVhostBlk(Napi::Env env, Napi::Object exports) {
  exports.Set("VhostBlkWorker", VhostBlkWorker::Define(env));
}

}  // namespace spindle
