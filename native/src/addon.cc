// Module entry: per-env instance data (the slab registry) and registration of
// the engine class and the host-fact functions.
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace spindle {

AddonData::~AddonData() {
  // Runs at env teardown, after engine cleanup hooks have stopped all I/O.
  for (auto& s : slabs) free(s.base);
}

// allocSlab(size) -> [id, ArrayBuffer]; size is rounded up to 4 KiB.
static Napi::Value AllocSlab(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData* data = env.GetInstanceData<AddonData>();
  double want = info[0].As<Napi::Number>().DoubleValue();
  // Offsets in descriptors are int32, so a slab must stay below 2 GiB.
  if (!(want > 0) || want > 1073741824.0) {
    Napi::RangeError::New(env, "slab size must be in (0, 1 GiB]").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  size_t size = ((size_t)want + 4095) & ~(size_t)4095;
  void* mem = nullptr;
  int rc = posix_memalign(&mem, 4096, size);
  if (rc != 0) {
    Napi::Error::New(env, std::string("slab allocation failed: ") + strerror(rc))
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  memset(mem, 0, size);  // no stale heap contents visible to JS
  data->slabs.push_back({(uint8_t*)mem, size});
  // Every live ring learns about the slab (fixed-buffer registration).
  uint32_t id = (uint32_t)(data->slabs.size() - 1);
  for (Backend* b : data->backends) b->AddSlab(id, data->slabs.back());
  // External: the memory is owned by AddonData, never by the ArrayBuffer.
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, mem, size);
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, (double)(data->slabs.size() - 1)));
  out.Set(1u, ab);
  return out;
}

// aliasMemory(memory, offset, length) -> ArrayBuffer over [offset, offset+length) of a
// WebAssembly.Memory's bytes. Growing a wasm memory detaches its ArrayBuffers, but on 64-bit
// hosts V8 grows it in place, so this alias (external, never detached) stays valid; it holds
// the Memory object until it is collected, so the bytes outlive every view of them.
static Napi::Value AliasMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject() || !info[1].IsNumber() || !info[2].IsNumber()) {
    Napi::TypeError::New(env, "aliasMemory(memory, offset, length)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Object memory = info[0].As<Napi::Object>();
  Napi::Value buf = memory.Get("buffer");
  if (!buf.IsArrayBuffer()) {
    Napi::TypeError::New(env, "aliasMemory: memory.buffer is not an ArrayBuffer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::ArrayBuffer ab = buf.As<Napi::ArrayBuffer>();
  double offset = info[1].As<Napi::Number>().DoubleValue();
  double length = info[2].As<Napi::Number>().DoubleValue();
  if (!(offset >= 0) || !(length > 0) || offset + length > (double)ab.ByteLength()) {
    Napi::RangeError::New(env, "aliasMemory: range outside the memory").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto* keep = new Napi::ObjectReference(Napi::Persistent(memory));
  return Napi::ArrayBuffer::New(
      env, (uint8_t*)ab.Data() + (size_t)offset, (size_t)length,
      [](Napi::Env, void*, Napi::ObjectReference* ref) { delete ref; }, keep);
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData<AddonData>(new AddonData());
  exports.Set("allocSlab", Napi::Function::New(env, AllocSlab, "allocSlab"));
  exports.Set("aliasMemory", Napi::Function::New(env, AliasMemory, "aliasMemory"));
  InitEngine(env, exports);
  InitHostFacts(env, exports);
  InitUnixFd(env, exports);
  InitVhostBlk(env, exports);
  return exports;
}

}  // namespace spindle

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  return spindle::Init(env, exports);
}
NODE_API_MODULE(spindle_native, InitModule)
