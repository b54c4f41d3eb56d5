// The VhostBlkWorker JS class: validates arguments, owns the Queue objects
// (and references to the JS memory they use), and hands everything to the
// Worker thread as commands (see worker.h).
#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../common.h"
#include "napi_queue.h"
#include "worker.h"

namespace spindle {
namespace {

using vhostblk::DefaultMemory;
using vhostblk::Err;
using vhostblk::Int;
using vhostblk::kMaxQueues;
using vhostblk::kSector;
using vhostblk::Queue;
using vhostblk::QueueRefs;
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
                        InstanceMethod<&VhostBlkWorker::SetCapacity>("setCapacity"),
                        InstanceMethod<&VhostBlkWorker::Barrier>("barrier"),
                        InstanceMethod<&VhostBlkWorker::Kick>("kick"),
                        InstanceMethod<&VhostBlkWorker::Pause>("pause"),
                        InstanceMethod<&VhostBlkWorker::Resume>("resume"),
                        InstanceMethod<&VhostBlkWorker::Stats>("stats"),
                        InstanceMethod<&VhostBlkWorker::Destroy>("destroy"),
                        InstanceAccessor<&VhostBlkWorker::GetThreadId>("threadId"),
                        InstanceAccessor<&VhostBlkWorker::GetIoMode>("ioMode"),
                        InstanceAccessor<&VhostBlkWorker::GetIoEngine>("ioEngine")});
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

  static Napi::Value Fail(Napi::Env env, const std::string& msg, bool range = false) {
    return vhostblk::Throw(env, msg, range ? Err::kRange : Err::kError);
  }

  Queue* Lookup(const Napi::CallbackInfo& info) {
    double idx;
    if (!worker_) return Fail(info.Env(), "destroyed"), nullptr;
    if (!Int(info[0], 0, kMaxQueues - 1, &idx)) return Fail(info.Env(), "queue index out of range", true), nullptr;
    Queue* q = queues_[(uint32_t)idx];
    if (!q) return Fail(info.Env(), "queue " + std::to_string((uint32_t)idx) + " is not attached"), nullptr;
    return q;
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
    if (!vhostblk::ParseSpans(env, info[1], (double)ab.ByteLength(), &spans)) return env.Undefined();
    if (ab.ByteLength() == 0 || ab.Data() == nullptr) spans.clear();
    memory_ = Napi::Persistent(Napi::Object(env, ab));  // keeps the mapping alive
    def_.spans = spans;
    def_.mem = (uint8_t*)ab.Data();
    def_.set = !spans.empty();
    return env.Undefined();
  }

  // addQueue(index, options): see NewQueue (napi_queue.cc).
  Napi::Value AddQueue(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!worker_) return Fail(env, "destroyed");
    double idx;
    if (!Int(info[0], 0, kMaxQueues - 1, &idx)) return Fail(env, "queue index out of range", true);
    if (queues_[(uint32_t)idx]) return Fail(env, "queue " + std::to_string((uint32_t)idx) + " is already attached");
    if (!info[1].IsObject()) return Fail(env, "addQueue(index, options)");
    QueueRefs refs;
    Queue* q = vhostblk::NewQueue(env, (uint32_t)idx, info[1].As<Napi::Object>(), def_, &refs);
    if (!q) return env.Undefined();
    if (worker_->io_mode() != vhostblk::IoMode::kSync) vhostblk::AllocAioSlots(q);
    int r = worker_->Command(Worker::kAdd, q, q->index, -1);
    if (r < 0) {
      vhostblk::CloseFds(q);
      delete q;
      return Fail(env, std::string("addQueue: epoll: ") + strerror(-r));
    }
    queues_[q->index] = q;
    // The guest memory and the forward ring outlive the queue (the map is
    // held by the Queue's shared_ptr).
    qmem_[q->index] = Napi::Persistent(refs.memory.IsEmpty() ? memory_.Value() : refs.memory);
    if (!refs.ring.IsEmpty()) qring_[q->index] = Napi::Persistent(refs.ring);
    if (!refs.inflight.IsEmpty()) qlog_[q->index] = Napi::Persistent(refs.inflight);
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
    o.Set("kicks", (double)q->kicks.load());
    o.Set("holds", (double)q->holds.load());
    o.Set("holdsJoined", (double)q->holds_joined.load());
    o.Set("busyNs", (double)q->busy_ns.load());
    o.Set("forwarded", (double)q->forwarded.load());
    o.Set("inForward", (double)q->in_forward.load());
    o.Set("asyncRequests", (double)q->async_requests.load());
    o.Set("inAsync", (double)q->in_async.load());
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
    qring_[q->index].Reset();
    qlog_[q->index].Reset();
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

  // setCapacity(index, sectors): a resize, between requests.
  Napi::Value SetCapacity(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Queue* q = Lookup(info);
    if (!q) return env.Undefined();
    double cap;
    if (!Int(info[1], 0, 9007199254740991.0 / kSector, &cap)) return Fail(env, "setCapacity: sectors out of range", true);
    worker_->Command(Worker::kSetCapacity, q, q->index, -1, (uint64_t)cap);
    return env.Undefined();
  }

  // barrier(): returns once the worker is between requests and has no I/O on
  // its ring, so no request still uses map entries invalidated before the call.
  Napi::Value Barrier(const Napi::CallbackInfo& info) {
    if (!worker_) return Fail(info.Env(), "destroyed");
    worker_->Command(Worker::kBarrier, nullptr, 0, -1);
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

  // "sync" | "async" | "auto": $SPINDLE_VHOST_IO at construction, sync without io_uring.
  Napi::Value GetIoMode(const Napi::CallbackInfo& info) {
    static const char* const names[] = {"sync", "async", "auto"};
    if (!worker_) return info.Env().Null();
    return Napi::String::New(info.Env(), names[(int)worker_->io_mode()]);
  }

  // "io_uring" | "threads" | "sync": what does the asynchronous I/O.
  Napi::Value GetIoEngine(const Napi::CallbackInfo& info) {
    if (!worker_) return info.Env().Null();
    return Napi::String::New(info.Env(), worker_->io_engine());
  }

  Napi::Value GetThreadId(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), worker_ ? (double)worker_->tid_.load() : 0);
  }

  // destroy(): stops and joins the thread, closes every dup'd fd. Idempotent.
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Teardown();
    memory_.Reset();
    for (auto& r : qmem_) r.Reset();
    for (auto& r : qring_) r.Reset();
    for (auto& r : qlog_) r.Reset();
    def_ = DefaultMemory();
    return info.Env().Undefined();
  }

  std::unique_ptr<Worker> worker_;
  std::vector<Queue*> queues_;  // JS-thread view: attached queues (owned here)
  uint32_t attached_ = 0;
  Napi::ObjectReference memory_;
  DefaultMemory def_;  // with memory_: the default memory of new queues
  std::vector<Napi::ObjectReference> qmem_ = std::vector<Napi::ObjectReference>(kMaxQueues);
  std::vector<Napi::ObjectReference> qring_ = std::vector<Napi::ObjectReference>(kMaxQueues);
  std::vector<Napi::ObjectReference> qlog_ = std::vector<Napi::ObjectReference>(kMaxQueues);
  napi_env env_ = nullptr;
  bool hook_ = false;
};

}  // namespace

void InitVhostBlk(Napi::Env env, Napi::Object exports) {
  exports.Set("VhostBlkWorker", VhostBlkWorker::Define(env));
  vhostblk::InitVhostBlkMap(env, exports);
}

}  // namespace spindle
