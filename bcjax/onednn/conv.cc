// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI custom calls.
//
// Why: XLA:CPU lowers a convolution and its two gradients to generic code that
// runs several times slower than oneDNN's JIT kernels for this project's shapes
// (few channels, large maps; docs/benchmarks.md). PyTorch's CPU convolutions are
// oneDNN's, so this is what a fair CPU comparison needs.
//
// Layouts are JAX's: activations NHWC, kernels HWIO (flax.linen.Conv's), stride
// 1, no dilation, one group; padding (top, bottom, left, right) comes as
// attributes. Activations stay in NHWC (oneDNN's nhwc kernels read them in
// place); only the small kernel is reordered to oneDNN's blocked layout and back.
// Primitives are built once per shape and cached; each call gets its own
// scratchpad, so concurrent calls (several host devices under pmap) are safe.

#include <array>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// n, h, w, c, kh, kw, o, oh, ow, pad top, bottom, left, right.
using Geometry = std::array<int64_t, 13>;

struct Descs {
  memory::desc src, weights_user, weights_any, bias, dst;
  memory::dims strides{1, 1}, pad_l, pad_r;
};

Descs MakeDescs(const Geometry& g) {
  const auto [n, h, w, c, kh, kw, o, oh, ow, pt, pb, pl, pr] = g;
  Descs d;
  d.src = memory::desc({n, c, h, w}, Dt::f32, Tag::nhwc);
  d.weights_user = memory::desc({o, c, kh, kw}, Dt::f32, Tag::hwio);
  d.weights_any = memory::desc({o, c, kh, kw}, Dt::f32, Tag::any);
  d.bias = memory::desc({o}, Dt::f32, Tag::a);
  d.dst = memory::desc({n, o, oh, ow}, Dt::f32, Tag::nhwc);
  d.pad_l = {pt, pl};
  d.pad_r = {pb, pr};
  return d;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Descs& d) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      d.src, d.weights_any, d.bias, d.dst, d.strides, d.pad_l, d.pad_r, UserScratchpad());
}

// One cached set of primitives per (operation, geometry).
struct Plan {
  Descs descs;                 // The caller's layouts (NHWC, HWIO).
  dnnl::primitive conv;
  memory::desc weights;        // The layout the primitive wants its kernel in.
  memory::desc scratchpad;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // HWIO -> blocked (forward, backward data) or back.
};

enum Op : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

Plan BuildPlan(Op op, const Geometry& g) {
  Plan plan;
  plan.descs = MakeDescs(g);
  const Descs& d = plan.descs;
  const auto fwd = ForwardPd(d);
  if (op == kForward) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.weights = fwd.weights_desc();
    plan.scratchpad = fwd.scratchpad_desc();
  } else if (op == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.dst,
        d.strides, d.pad_l, d.pad_r, fwd, UserScratchpad());
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.weights = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.bias, d.dst,
        d.strides, d.pad_l, d.pad_r, fwd, UserScratchpad());
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.weights = pd.diff_weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  }
  plan.reorder_weights = plan.weights != d.weights_user;
  if (plan.reorder_weights) {
    plan.weights_reorder = op == kBackwardWeights
        ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plan.weights, Engine(), d.weights_user))
        : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), d.weights_user, Engine(), plan.weights));
  }
  return plan;
}

const Plan& GetPlan(Op op, const Geometry& g) {
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<int64_t, Geometry>, std::unique_ptr<Plan>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = (*cache)[{op, g}];
  if (!slot) slot = std::make_unique<Plan>(BuildPlan(op, g));
  return *slot;
}

// Runs one planned convolution. `user_weights` is the HWIO kernel (read for the
// forward and backward-data passes, written by the backward-weights pass).
ffi::Error Run(Op op, const Geometry& g, float* src, float* user_weights, float* bias,
               float* dst) {
  try {
    const Plan& plan = GetPlan(op, g);
    const Descs& d = plan.descs;
    dnnl::engine& eng = Engine();
    dnnl::stream stream(eng);
    // Uninitialised (oneDNN writes before it reads) and cache-line aligned.
    const size_t bytes = (plan.scratchpad.get_size() / 64 + 1) * 64;
    std::unique_ptr<void, decltype(&std::free)> scratch(std::aligned_alloc(64, bytes), &std::free);
    memory scratch_m(plan.scratchpad, eng, scratch.get());
    memory src_m(d.src, eng, src), dst_m(d.dst, eng, dst), bias_m(d.bias, eng, bias);
    memory user_w(d.weights_user, eng, user_weights);
    memory w = plan.reorder_weights ? memory(plan.weights, eng) : user_w;
    if (op != kBackwardWeights && plan.reorder_weights) {
      plan.weights_reorder.execute(stream, user_w, w);
    }
    if (op == kForward) {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_BIAS, bias_m}, {DNNL_ARG_DST, dst_m},
                                 {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (op == kBackwardData) {
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, w},
                                 {DNNL_ARG_DIFF_BIAS, bias_m}, {DNNL_ARG_DIFF_DST, dst_m},
                                 {DNNL_ARG_SCRATCHPAD, scratch_m}});
      if (plan.reorder_weights) plan.weights_reorder.execute(stream, w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr) {
  return {x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], pt, pb, pl, pr};
}

ffi::Error CheckRanks(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("bcjax oneDNN conv: expects NHWC, HWIO, NHWC");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr) {
  if (auto e = CheckRanks(x.dimensions(), w.dimensions(), y->dimensions()); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), pt, pb, pl, pr);
  return Run(kForward, g, x.typed_data(), w.typed_data(), b.typed_data(), y->typed_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> gx, int64_t pt, int64_t pb, int64_t pl,
                        int64_t pr) {
  if (auto e = CheckRanks(gx->dimensions(), w.dimensions(), gy.dimensions()); e.failure()) return e;
  const Geometry g =
      MakeGeometry(gx->dimensions(), w.dimensions(), gy.dimensions(), pt, pb, pl, pr);
  return Run(kBackwardData, g, gx->typed_data(), w.typed_data(), nullptr, gy.typed_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                           ffi::ResultBuffer<ffi::F32> gw, ffi::ResultBuffer<ffi::F32> gb,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = CheckRanks(x.dimensions(), gw->dimensions(), gy.dimensions()); e.failure()) return e;
  const Geometry g =
      MakeGeometry(x.dimensions(), gw->dimensions(), gy.dimensions(), pt, pb, pl, pr);
  return Run(kBackwardWeights, g, x.typed_data(), gw->typed_data(), gb->typed_data(),
             gy.typed_data());
}

}  // namespace

#define BCJAX_PADDING_ATTRS \
  .Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BCJAX_PADDING_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BCJAX_PADDING_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BCJAX_PADDING_ATTRS);
