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

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData<AddonData>(new AddonData());
  exports.Set("allocSlab", Napi::Function::New(env, AllocSlab, "allocSlab"));
  InitEngine(env, exports);
  InitHostFacts(env, exports);
  return exports;
}

}  // namespace spindle

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  return spindle::Init(env, exports);
}
NODE_API_MODULE(spindle_native, InitModule)
