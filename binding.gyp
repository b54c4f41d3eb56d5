{
  "targets": [
    {
      "target_name": "spindle_native",
      "sources": [
        "native/src/addon.cc",
        "native/src/engine.cc",
        "native/src/uring.cc",
        "native/src/uring_rings.cc",
        "native/src/pool.cc",
        "native/src/hostfacts.cc",
        "native/src/unixfd/socket.cc",
        "native/src/unixfd/memory.cc",
        "native/src/unixfd/sendfile.cc",
        "native/src/vhostblk/worker.cc",
        "native/src/vhostblk/ring.cc",
        "native/src/vhostblk/coalesce.cc",
        "native/src/vhostblk/request.cc",
        "native/src/vhostblk/napi.cc",
        "native/src/vhostblk/napi_queue.cc",
        "native/src/vhostblk/map.cc",
        "native/src/vhostblk/forward.cc",
        "native/src/vhostblk/aio.cc",
        "native/src/vhostblk/iouring.cc",
        "native/src/vhostblk/pool_ring.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "ldflags": ["-pthread"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"]
    }
  ]
}
