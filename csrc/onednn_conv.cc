// NHWC x HWIO 2-D convolution (forward, input gradient, kernel gradient) as XLA FFI
// handlers backed by oneDNN, for XLA:CPU. Loaded by qsparse/cpu/onednn.py; optional at build time.
// Builds against oneDNN 2.x (Debian 12's libdnnl-dev 2.6) and 3.x (PyPI's onednn-devel-cpu-gomp
// 3.2, what setup.py prefers).
//
// Why: on the CPU measured (results/bench_cpu.md) oneDNN's convolution kernels ran the Conv-4
// layers 1.1-2.8x faster than XLA:CPU's. Activations stay in the caller's NHWC layout (oneDNN's
// brgconv/jit kernels take it directly); kernels are reordered per call to oneDNN's blocked
// layout, which is cheap next to the convolution itself.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/dnnl/dnnl_version.h"  // DNNL_VERSION_MAJOR
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

// N, H, W, C (input), KH, KW, O (kernel), padding lo/hi for H and W, strides for H and W.
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Conv {
  memory::desc x_md, y_md, w_user_md;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;

  explicit Conv(const Key& k) {
    auto [n, h, w, c, kh, kw, o, pt, pb, pl, pr, sh, sw] = k;
    const memory::dims x_dims{n, c, h, w}, w_dims{o, c, kh, kw},
        y_dims{n, o, (h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1};
    const memory::dims strides{sh, sw}, pad_lo{pt, pl}, pad_hi{pb, pr};
    x_md = memory::desc(x_dims, memory::data_type::f32, tag::nhwc);
    y_md = memory::desc(y_dims, memory::data_type::f32, tag::nhwc);
    w_user_md = memory::desc(w_dims, memory::data_type::f32, tag::hwio);
    const memory::desc w_any(w_dims, memory::data_type::f32, tag::any);
    const auto alg = dnnl::algorithm::convolution_direct;
#if DNNL_VERSION_MAJOR >= 3  // 3.x: no operation descriptors; primitive descriptors take their arguments
    fwd_pd = {Engine(), dnnl::prop_kind::forward_training, alg, x_md, w_any, y_md, strides, pad_lo, pad_hi};
    bwd_data_pd = {Engine(), alg, x_md, w_any, y_md, strides, pad_lo, pad_hi, fwd_pd};
    bwd_weights_pd = {Engine(), alg, x_md, w_any, y_md, strides, pad_lo, pad_hi, fwd_pd};
#else  // 2.x (Debian 12's libdnnl-dev 2.6): primitive descriptors from operation descriptors
    fwd_pd = {{dnnl::prop_kind::forward_training, alg, x_md, w_any, y_md, strides, pad_lo, pad_hi}, Engine()};
    bwd_data_pd = {{alg, x_md, w_any, y_md, strides, pad_lo, pad_hi}, Engine(), fwd_pd};
    bwd_weights_pd = {{alg, x_md, w_any, y_md, strides, pad_lo, pad_hi}, Engine(), fwd_pd};
#endif
    fwd = dnnl::convolution_forward(fwd_pd);
    bwd_data = dnnl::convolution_backward_data(bwd_data_pd);
    bwd_weights = dnnl::convolution_backward_weights(bwd_weights_pd);
  }
};

// Called only under ExecutionMutex (see Guarded), which also guards the cache.
const Conv& Get(const Key& key) {
  static std::map<Key, std::unique_ptr<Conv>> cache;
  auto& entry = cache[key];
  if (!entry) entry = std::make_unique<Conv>(key);
  return *entry;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// `kernel` in the user's HWIO layout as the memory a primitive wants (a reorder when it differs).
memory KernelAs(const memory::desc& want, const memory::desc& user, float* data) {
  memory m(user, Engine(), data);
  if (want == user) return m;
  memory out(want, Engine());
  dnnl::reorder(m, out).execute(Stream(), m, out);
  return out;
}

// One oneDNN call at a time. XLA runs independent custom calls concurrently (the two gradients
// of a layer; the devices of a pmap), but this oneDNN build shares one scratchpad between
// primitives (DNNL_ENABLE_CONCURRENT_EXEC off: concurrent calls gave wrong results and hung a
// 2-device all-reduce), and each call already uses every core through OpenMP.
std::mutex& ExecutionMutex() {
  static std::mutex mu;
  return mu;
}

template <typename F>
ffi::Error Guarded(F&& f) {
  std::lock_guard<std::mutex> lock(ExecutionMutex());
  try {
    f();
    Stream().wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

Key MakeKey(ffi::Span<const int64_t> x, int64_t kh, int64_t kw, int64_t o, int64_t pt, int64_t pb, int64_t pl,
            int64_t pr, int64_t sh, int64_t sw) {
  return Key{x[0], x[1], x[2], x[3], kh, kw, o, pt, pb, pl, pr, sh, sw};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t sh, int64_t sw) {
  auto wd = w.dimensions();
  if (x.dimensions().size() != 4 || wd.size() != 4 || wd[2] != x.dimensions()[3])
    return ffi::Error::InvalidArgument("conv: expected (N,H,W,C) x (KH,KW,C,O)");
  return Guarded([&] {
    const Conv& c = Get(MakeKey(x.dimensions(), wd[0], wd[1], wd[3], pt, pb, pl, pr, sh, sw));
    memory xm(c.x_md, Engine(), x.typed_data()), ym(c.y_md, Engine(), y->typed_data());
    memory wm = KernelAs(c.fwd_pd.weights_desc(), c.w_user_md, w.typed_data());
    c.fwd.execute(Stream(), {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
  });
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr, int64_t sh, int64_t sw) {
  auto wd = w.dimensions();
  return Guarded([&] {
    const Conv& c = Get(MakeKey(dx->dimensions(), wd[0], wd[1], wd[3], pt, pb, pl, pr, sh, sw));
    memory dym(c.y_md, Engine(), dy.typed_data()), dxm(c.x_md, Engine(), dx->typed_data());
    memory wm = KernelAs(c.bwd_data_pd.weights_desc(), c.w_user_md, w.typed_data());
    c.bwd_data.execute(Stream(), {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm}});
  });
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t sh, int64_t sw) {
  auto wd = dw->dimensions();
  return Guarded([&] {
    const Conv& c = Get(MakeKey(x.dimensions(), wd[0], wd[1], wd[3], pt, pb, pl, pr, sh, sw));
    memory xm(c.x_md, Engine(), x.typed_data()), dym(c.y_md, Engine(), dy.typed_data());
    memory user(c.w_user_md, Engine(), dw->typed_data());
    const bool direct = c.bwd_weights_pd.diff_weights_desc() == c.w_user_md;
    memory dwm = direct ? user : memory(c.bwd_weights_pd.diff_weights_desc(), Engine());
    c.bwd_weights.execute(Stream(), {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dwm}});
    if (!direct) dnnl::reorder(dwm, user).execute(Stream(), dwm, user);
  });
}

}  // namespace

#define QSPARSE_CONV_BINDING                                                              \
  ffi::Ffi::Bind()                                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                  \
      .Attr<int64_t>("pad_top")                                                                      \
      .Attr<int64_t>("pad_bottom")                                                                   \
      .Attr<int64_t>("pad_left")                                                                     \
      .Attr<int64_t>("pad_right")                                                                    \
      .Attr<int64_t>("stride_h")                                                                     \
      .Attr<int64_t>("stride_w")

XLA_FFI_DEFINE_HANDLER_SYMBOL(QsparseConvForward, Forward, QSPARSE_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QsparseConvInputGrad, InputGrad, QSPARSE_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QsparseConvKernelGrad, KernelGrad, QSPARSE_CONV_BINDING);
