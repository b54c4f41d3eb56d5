// Guest memory and signalling for vhost-user: MAP_SHARED mappings of fds
// exposed as external ArrayBuffers, eventfd and memfd; and InitUnixFd, which
// registers these and the socket functions (socket.cc).
#include <linux/memfd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <v8.h>

#include "args.h"

namespace spindle {
namespace unixfd {
namespace {

constexpr double kMaxSafe = 9007199254740991.0;  // 2^53 - 1

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

void FinalizeMappingAnyThread(void*, size_t, void* hint) { FinalizeMapping(nullptr, nullptr, hint); }

// An external ArrayBuffer over [data, +len) whose collection unmaps mapping
// `id`, at any size: napi_create_external_arraybuffer goes through a Buffer,
// which Node 20 caps at 4 GiB, and a large guest's layout spans more.  V8 may
// run the deleter on any thread: FinalizeMapping only takes the map's lock and
// munmaps.  A Local's slot is what napi_value points at (Node's own
// JsValueFromV8LocalValue); the callback's handle scope keeps it alive.
napi_value LargeExternalArrayBuffer(uint8_t* data, size_t len, uintptr_t id) {
  v8::Isolate* isolate = v8::Isolate::GetCurrent();
  std::unique_ptr<v8::BackingStore> store =
      v8::ArrayBuffer::NewBackingStore(data, len, FinalizeMappingAnyThread, (void*)id);
  v8::Local<v8::ArrayBuffer> ab = v8::ArrayBuffer::New(isolate, std::move(store));
  return reinterpret_cast<napi_value>(*ab);
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
  return Napi::Value(env, LargeExternalArrayBuffer(m.user, m.ulen, id));
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

void ExportMemory(Napi::Env env, Napi::Object exports) {
  exports.Set("mmapFd", Napi::Function::New(env, MmapFd, "mmapFd"));
  exports.Set("mmapLayout", Napi::Function::New(env, MmapLayout, "mmapLayout"));
  exports.Set("unmap", Napi::Function::New(env, Unmap, "unmap"));
  exports.Set("mappingCount", Napi::Function::New(env, MappingCount, "mappingCount"));
  exports.Set("eventfd", Napi::Function::New(env, EventFd, "eventfd"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventFdWrite, "eventfdWrite"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventFdRead, "eventfdRead"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
}

}  // namespace unixfd

void InitUnixFd(Napi::Env env, Napi::Object exports) {
  unixfd::ExportSockets(env, exports);
  unixfd::ExportMemory(env, exports);
  unixfd::ExportSendFile(env, exports);
}

}  // namespace spindle
