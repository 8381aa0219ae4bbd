// Standalone correctness check of the csrc/ kernels against float64 CPU references, without torch.
// Not part of the extension (setup.py builds csrc/*.cu only). On a GPU machine:
//
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        csrc/tools/standalone_check.cu csrc/device_info.cu csrc/divergence*.cu csrc/adv_step*.cu \
//        csrc/perturb.cu -o /tmp/modkern_check && /tmp/modkern_check
//
// It runs every divergence kind through every forward code path (shared-memory rows with clusters
// of 1/2/4/8 blocks, streamed rows, 16-byte and scalar accesses), both backward kernels, every
// (step, norm) pair of the PGD step and both perturb kernels, prints one line per case and exits
// non-zero on any mismatch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../adv_step.h"
#include "../divergence.h"
#include "../perturb.h"

using namespace modkern;

#define CHECK_CUDA(x)                                                                          \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

static int g_failures = 0;
static int g_cases = 0;

// ------------------------------------------------------------------------------------------------
// Host element types
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Host;
template <>
struct Host<float> {
  static float from(double x) { return static_cast<float>(x); }
  static double to(float x) { return x; }
  static DType dtype() { return DType::kFloat32; }
  static const char* name() { return "f32"; }
};
template <>
struct Host<__nv_bfloat16> {
  static __nv_bfloat16 from(double x) { return __float2bfloat16(static_cast<float>(x)); }
  static double to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static DType dtype() { return DType::kBFloat16; }
  static const char* name() { return "bf16"; }
};

template <typename T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) { CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(ptr); }
  void upload(const std::vector<T>& h) { CHECK_CUDA(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    CHECK_CUDA(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison() { CHECK_CUDA(cudaMemset(ptr, 0xff, n * sizeof(T))); }  // NaN for every float type
};

// max |got - want| / (atol + rtol |want|) <= 1, NaN never passes.
struct Cmp {
  double worst = 0.0;
  bool bad = false;
  void add(double got, double want, double atol, double rtol) {
    if (got == want) return;
    if (std::isnan(got) != std::isnan(want) || std::isinf(got) != std::isinf(want)) {
      bad = true;
      return;
    }
    if (std::isinf(want)) return;
    const double r = std::fabs(got - want) / (atol + rtol * std::fabs(want));
    if (!(r <= 1.0)) bad = true;
    worst = std::max(worst, r);
  }
};

static void report(const std::string& name, const Cmp& c) {
  ++g_cases;
  if (c.bad) ++g_failures;
  std::printf("%-4s %-90s worst=%.3g\n", c.bad ? "FAIL" : "ok", name.c_str(), c.worst);
}

// ------------------------------------------------------------------------------------------------
// Divergence
// ------------------------------------------------------------------------------------------------

struct RowRef {
  double loss, lse_a, lse_b, s_p, s_q;
  std::vector<double> ga, gb;  // d loss / d logits (1/T included)
};

static RowRef divergence_row_ref(const double* pa, const double* qb, int64_t V, int kind, double beta, double inv_t) {
  std::vector<double> a(V), b(V), lp(V), lq(V), P(V), Q(V), xp(V), xq(V);
  double ma = -INFINITY, mb = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    a[v] = pa[v] * inv_t;
    b[v] = qb[v] * inv_t;
    ma = std::max(ma, a[v]);
    mb = std::max(mb, b[v]);
  }
  double sa = 0, sb = 0;
  for (int64_t v = 0; v < V; ++v) {
    sa += std::exp(a[v] - ma);
    sb += std::exp(b[v] - mb);
  }
  RowRef r;
  r.lse_a = ma + std::log(sa);
  r.lse_b = mb + std::log(sb);
  r.s_p = r.s_q = 0;
  for (int64_t v = 0; v < V; ++v) {
    lp[v] = a[v] - r.lse_a;
    lq[v] = b[v] - r.lse_b;
    P[v] = std::exp(lp[v]);
    Q[v] = std::exp(lq[v]);
    if (kind == kJS) {
      const double lm = std::log(beta * P[v] + (1 - beta) * Q[v]);
      xp[v] = xq[v] = lm;
    } else {
      xp[v] = lq[v];
      xq[v] = lp[v];
    }
    if (P[v] > 0) r.s_p += P[v] * (lp[v] - xp[v]);
    if (Q[v] > 0) r.s_q += Q[v] * (lq[v] - xq[v]);
  }
  r.loss = kind == kJS ? beta * r.s_p + (1 - beta) * r.s_q
                       : (kind == kKLForward ? r.s_p : (kind == kKLReverse ? r.s_q : r.s_p + r.s_q));
  r.ga.resize(V);
  r.gb.resize(V);
  for (int64_t v = 0; v < V; ++v) {
    const double own_p = P[v] > 0 ? P[v] * (lp[v] - xp[v] - r.s_p) : 0;
    const double own_q = Q[v] > 0 ? Q[v] * (lq[v] - xq[v] - r.s_q) : 0;
    double ga, gb;
    switch (kind) {
      case kJS:
        ga = beta * own_p;
        gb = (1 - beta) * own_q;
        break;
      case kKLForward:
        ga = own_p;
        gb = Q[v] - P[v];
        break;
      case kKLReverse:
        ga = P[v] - Q[v];
        gb = own_q;
        break;
      default:
        ga = own_p + P[v] - Q[v];
        gb = own_q + Q[v] - P[v];
    }
    r.ga[v] = ga * inv_t;
    r.gb[v] = gb * inv_t;
  }
  return r;
}

template <typename T>
static void check_divergence(std::mt19937& rng, int64_t N, int64_t R, int64_t V, int kind, bool use_ref, bool use_mask,
                             const DivTuning& tuning, const char* tname) {
  const double beta = 0.3, inv_t = 1.0 / 1.7;
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<T> hp(N * V), hq(R * V);
  std::vector<double> dp(N * V), dq(R * V);
  for (int64_t i = 0; i < N * V; ++i) {
    hp[i] = Host<T>::from(normal(rng));
    dp[i] = Host<T>::to(hp[i]);
  }
  for (int64_t i = 0; i < R * V; ++i) {
    hq[i] = Host<T>::from(normal(rng));
    dq[i] = Host<T>::to(hq[i]);
  }
  std::vector<int64_t> ref(R);
  for (int64_t r = 0; r < R; ++r) ref[r] = use_ref ? static_cast<int64_t>(rng() % N) : r;
  std::vector<uint8_t> mask_bytes(R);
  for (int64_t r = 0; r < R; ++r) mask_bytes[r] = use_mask ? (rng() % 3 != 0) : 1;
  bool* mask_host = reinterpret_cast<bool*>(mask_bytes.data());

  DevBuf<T> p(N * V), q(R * V), gp(N * V), gq(R * V);
  DevBuf<int64_t> dref(R);
  DevBuf<bool> dmask(R);
  DevBuf<float> loss(R), stats(R * 4);
  p.upload(hp);
  q.upload(hq);
  dref.upload(ref);
  CHECK_CUDA(cudaMemcpy(dmask.ptr, mask_host, R, cudaMemcpyHostToDevice));
  gp.poison();
  gq.poison();
  loss.poison();
  stats.poison();

  DivForwardArgs a;
  a.dtype = Host<T>::dtype();
  a.p = p.ptr;
  a.q = q.ptr;
  a.ref = use_ref ? dref.ptr : nullptr;
  a.mask = use_mask ? dmask.ptr : nullptr;
  a.loss = loss.ptr;
  a.stats = stats.ptr;
  a.grad_p = use_ref ? nullptr : gp.ptr;
  a.grad_q = gq.ptr;
  a.rows = R;
  a.vocab = V;
  a.stride_p = a.stride_q = a.stride_gp = a.stride_gq = V;
  a.kind = kind;
  a.beta = static_cast<float>(beta);
  a.inv_t = static_cast<float>(inv_t);
  DivLaunchInfo info;
  const cudaError_t err = launch_divergence_forward(a, tuning, 0, &info);
  char name[256];
  std::snprintf(name, sizeof(name), "divergence fwd %s kind=%d N=%lld R=%lld V=%lld ref=%d mask=%d tune(c%d,m%d)",
                tname, kind, (long long)N, (long long)R, (long long)V, use_ref, use_mask, tuning.cluster, tuning.cache);
  if (err == cudaErrorNotSupported || err == cudaErrorInvalidConfiguration) {
    std::printf("skip %-90s (%s)\n", name, cudaGetErrorString(err));
    return;
  }
  CHECK_CUDA(err);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::snprintf(name + std::strlen(name), sizeof(name) - std::strlen(name), " -> c%d cached%d t%d vec%d grid%d",
                info.cluster, info.cached, info.threads, info.vec, info.grid);

  const double g_rtol = std::is_same<T, float>::value ? 2e-4 : 1.6e-2;  // bf16 output: 2^-8 rounding
  const auto hl = loss.download(), hs = stats.download();
  const auto hgp = gp.download(), hgq = gq.download();
  Cmp c;
  std::vector<RowRef> refs(R);
  for (int64_t r = 0; r < R; ++r) {
    const bool active = mask_bytes[r] != 0;
    if (!active) {
      c.add(hl[r], 0.0, 1e-6, 0);
      for (int64_t v = 0; v < V; ++v) {
        c.add(Host<T>::to(hgq[r * V + v]), 0.0, 1e-6, 0);
        if (!use_ref) c.add(Host<T>::to(hgp[r * V + v]), 0.0, 1e-6, 0);
      }
      continue;
    }
    refs[r] = divergence_row_ref(&dp[ref[r] * V], &dq[r * V], V, kind, beta, inv_t);
    const RowRef& rr = refs[r];
    c.add(hl[r], rr.loss, 1e-5, 1e-4);
    c.add(hs[r * 4 + 0], rr.lse_a, 1e-5, 1e-5);
    c.add(hs[r * 4 + 1], rr.lse_b, 1e-5, 1e-5);
    c.add(hs[r * 4 + 2], rr.s_p, 1e-5, 1e-4);
    c.add(hs[r * 4 + 3], rr.s_q, 1e-5, 1e-4);
    for (int64_t v = 0; v < V; ++v) {
      c.add(Host<T>::to(hgq[r * V + v]), rr.gb[v], 1e-6, g_rtol);
      if (!use_ref) c.add(Host<T>::to(hgp[r * V + v]), rr.ga[v], 1e-6, g_rtol);
    }
  }
  report(name, c);

  // Backward: grad_rows w; grad_q = w * stored grad; grad_p recomputed over the copies with ref.
  std::vector<float> w(R);
  std::uniform_real_distribution<float> unif(0.5f, 1.5f);
  for (auto& x : w) x = unif(rng);
  DevBuf<float> dw(R);
  dw.upload(w);
  DevBuf<T> out_q(R * V), out_p(N * V);
  out_q.poison();
  out_p.poison();
  ScaleRowsArgs s;
  s.dtype = Host<T>::dtype();
  s.src = gq.ptr;
  s.dst = out_q.ptr;
  s.scale = dw.ptr;
  s.mask = use_mask ? dmask.ptr : nullptr;
  s.rows = R;
  s.vocab = V;
  s.stride_src = s.stride_dst = V;
  CHECK_CUDA(launch_divergence_scale_rows(s, 0));
  std::vector<int64_t> order(R), start(N), count(N, 0);
  if (use_ref) {
    for (int64_t r = 0; r < R; ++r) ++count[ref[r]];
    int64_t acc = 0;
    for (int64_t n = 0; n < N; ++n) {
      start[n] = acc;
      acc += count[n];
    }
    std::vector<int64_t> fill(start);
    for (int64_t r = 0; r < R; ++r) order[fill[ref[r]]++] = r;
    DevBuf<int64_t> dorder(R), dstart(N), dcount(N);
    dorder.upload(order);
    dstart.upload(start);
    dcount.upload(count);
    GradPSharedArgs g;
    g.dtype = Host<T>::dtype();
    g.p = p.ptr;
    g.q = q.ptr;
    g.order = dorder.ptr;
    g.start = dstart.ptr;
    g.count = dcount.ptr;
    g.mask = use_mask ? dmask.ptr : nullptr;
    g.grad_rows = dw.ptr;
    g.stats = stats.ptr;
    g.grad_p = out_p.ptr;
    g.num_p_rows = N;
    g.vocab = V;
    g.stride_p = g.stride_q = g.stride_gp = V;
    g.kind = kind;
    g.beta = static_cast<float>(beta);
    g.inv_t = static_cast<float>(inv_t);
    CHECK_CUDA(launch_divergence_grad_p_shared(g, 0));
  } else {
    s.src = gp.ptr;
    s.dst = out_p.ptr;
    CHECK_CUDA(launch_divergence_scale_rows(s, 0));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto hq2 = out_q.download(), hp2 = out_p.download();
  Cmp cb;
  std::vector<double> want_p(N * V, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const bool active = mask_bytes[r] != 0;
    for (int64_t v = 0; v < V; ++v) {
      const double wq = active ? Host<T>::to(hgq[r * V + v]) * static_cast<double>(w[r]) : 0.0;
      cb.add(Host<T>::to(hq2[r * V + v]), wq, 1e-6, g_rtol);
      if (active) want_p[ref[r] * V + v] += use_ref ? refs[r].ga[v] * w[r] : Host<T>::to(hgp[r * V + v]) * w[r];
    }
  }
  for (int64_t i = 0; i < N * V; ++i) cb.add(Host<T>::to(hp2[i]), want_p[i], 1e-6, g_rtol);
  std::string bname = std::string("divergence bwd ") + (use_ref ? "grad_p_shared+" : "") + "scale_rows " + tname +
                      " kind=" + std::to_string(kind) + " V=" + std::to_string(V);
  report(bname, cb);
}

// ------------------------------------------------------------------------------------------------
// Masked PGD step
// ------------------------------------------------------------------------------------------------

static void adv_ref(const std::vector<double>& delta, const std::vector<double>& grad, const std::vector<uint8_t>& mask,
                    int64_t B, int64_t L, int64_t H, double alpha, double eps, int step, int norm,
                    std::vector<double>& out) {
  out.assign(B * L * H, 0.0);
  std::vector<double> d(L * H), nw(L * H);
  for (int64_t b = 0; b < B; ++b) {
    double ss = 0, mx = 0;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i = (b * L + l) * H + h;
        const double g = mask[b * L + l] ? grad[i] : 0.0;
        ss += g * g;
        mx = std::max(mx, std::fabs(g));
      }
    for (int64_t l = 0; l < L; ++l) {
      double tn = 0;
      for (int64_t h = 0; h < H; ++h) {
        const double g = mask[b * L + l] ? grad[(b * L + l) * H + h] : 0.0;
        tn += g * g;
      }
      for (int64_t h = 0; h < H; ++h) {
        const double g = mask[b * L + l] ? grad[(b * L + l) * H + h] : 0.0;
        double x = g;
        if (step == kStepSign) x = g > 0 ? 1 : (g < 0 ? -1 : 0);
        if (step == kStepL2) x = g / std::max(std::sqrt(ss), 1e-12);
        if (step == kStepL2Token) x = g / std::max(std::sqrt(tn), 1e-12);
        if (step == kStepLinf) x = g / std::max(mx, 1e-12);
        d[l * H + h] = x;
      }
    }
    double n2 = 0;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i = (b * L + l) * H + h;
        nw[l * H + h] = mask[b * L + l] ? delta[i] + alpha * d[l * H + h] : 0.0;
        n2 += nw[l * H + h] * nw[l * H + h];
      }
    for (int64_t l = 0; l < L; ++l) {
      double t2 = 0;
      for (int64_t h = 0; h < H; ++h) t2 += nw[l * H + h] * nw[l * H + h];
      for (int64_t h = 0; h < H; ++h) {
        double x = nw[l * H + h];
        if (norm == kNormLinf) x = std::min(std::max(x, -eps), eps);
        if (norm == kNormL2) x *= eps / std::max(std::sqrt(n2), eps);
        if (norm == kNormL2Token) x *= eps / std::max(std::sqrt(t2), eps);
        out[(b * L + l) * H + h] = x;
      }
    }
  }
}

static void check_adv_step(std::mt19937& rng, int64_t B, int64_t L, int64_t H, int step, int norm, bool inplace) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const int64_t n = B * L * H;
  std::vector<float> hd(n);
  std::vector<__nv_bfloat16> hg(n);
  std::vector<double> dd(n), dg(n);
  std::vector<uint8_t> mask(B * L);
  for (int64_t i = 0; i < n; ++i) {
    hd[i] = static_cast<float>(1e-3 * normal(rng));
    dd[i] = hd[i];
    hg[i] = __float2bfloat16(static_cast<float>(normal(rng)));
    dg[i] = __bfloat162float(hg[i]);
  }
  for (auto& m : mask) m = rng() % 2;
  mask[0] = 1;
  const double alpha = 0.1, eps = (norm == kNormL2) ? 0.05 : 1e-3;
  DevBuf<float> d(n), o(n);
  DevBuf<__nv_bfloat16> g(n);
  DevBuf<bool> m(B * L);
  DevBuf<float> part(B * adv_step_num_chunks(L) * 4);
  d.upload(hd);
  g.upload(hg);
  CHECK_CUDA(cudaMemcpy(m.ptr, mask.data(), B * L, cudaMemcpyHostToDevice));
  o.poison();
  AdvStepArgs a;
  a.delta_dtype = DType::kFloat32;
  a.grad_dtype = DType::kBFloat16;
  a.delta = d.ptr;
  a.grad = g.ptr;
  a.mask = m.ptr;
  a.out = inplace ? static_cast<void*>(d.ptr) : static_cast<void*>(o.ptr);
  a.partials = part.ptr;
  a.alpha = static_cast<float>(alpha);
  a.eps = static_cast<float>(eps);
  a.B = B;
  a.L = L;
  a.H = H;
  a.sdb = a.sgb = a.sob = L * H;
  a.sdl = a.sgl = a.sol = H;
  a.sdh = a.sgh = a.soh = 1;
  a.smb = L;
  a.sml = 1;
  a.step = step;
  a.norm = norm;
  CHECK_CUDA(launch_adv_step(a, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto got = inplace ? d.download() : o.download();
  std::vector<double> want;
  adv_ref(dd, dg, mask, B, L, H, alpha, eps, step, norm, want);
  Cmp c;
  for (int64_t i = 0; i < n; ++i) c.add(got[i], want[i], 1e-7, 1e-4);
  report("adv_step f32 delta / bf16 grad B=" + std::to_string(B) + " L=" + std::to_string(L) + " H=" +
             std::to_string(H) + " step=" + std::to_string(step) + " norm=" + std::to_string(norm) +
             (inplace ? " inplace" : ""),
         c);
}

// ------------------------------------------------------------------------------------------------
// perturb
// ------------------------------------------------------------------------------------------------

static void check_perturb(std::mt19937& rng, int64_t N, int64_t H) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<__nv_bfloat16> he(N * H);
  std::vector<float> hd(N * H);
  std::vector<uint8_t> mask(N);
  for (int64_t i = 0; i < N * H; ++i) {
    he[i] = __float2bfloat16(static_cast<float>(normal(rng)));
    hd[i] = static_cast<float>(0.01 * normal(rng));
  }
  for (auto& m : mask) m = rng() % 2;
  DevBuf<__nv_bfloat16> e(N * H), out(N * H);
  DevBuf<float> d(N * H), gd(N * H);
  DevBuf<bool> m(N);
  e.upload(he);
  d.upload(hd);
  CHECK_CUDA(cudaMemcpy(m.ptr, mask.data(), N, cudaMemcpyHostToDevice));
  out.poison();
  gd.poison();
  PerturbArgs a;
  a.a_dtype = DType::kBFloat16;
  a.b_dtype = DType::kFloat32;
  a.a = e.ptr;
  a.b = d.ptr;
  a.mask = m.ptr;
  a.out = out.ptr;
  a.N = N;
  a.H = H;
  CHECK_CUDA(launch_perturb_forward(a, 0));
  PerturbArgs bw;  // grad_out = embeds (bf16) -> grad_delta (f32)
  bw.a_dtype = DType::kBFloat16;
  bw.b_dtype = DType::kFloat32;
  bw.a = e.ptr;
  bw.mask = m.ptr;
  bw.out = gd.ptr;
  bw.N = N;
  bw.H = H;
  CHECK_CUDA(launch_perturb_backward(bw, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto ho = out.download();
  const auto hgd = gd.download();
  Cmp c;
  for (int64_t r = 0; r < N; ++r)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i = r * H + h;
      const float want = __bfloat162float(he[i]) + (mask[r] ? hd[i] : 0.f);
      // Exact (atol = rtol = 0): the kernel rounds the same fp32 sum to bf16.
      c.add(__bfloat162float(ho[i]), __bfloat162float(__float2bfloat16(want)), 0, 0);
      c.add(hgd[i], mask[r] ? __bfloat162float(he[i]) : 0.0, 0, 0);
    }
  report("perturb fwd+bwd bf16 embeds / f32 delta N=" + std::to_string(N) + " H=" + std::to_string(H), c);
}

int main() {
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  DeviceInfo info;
  CHECK_CUDA(get_device_info(dev, &info));
  std::printf("device %d: sm_%d%d, %d SMs, L2 %d KiB, smem/block opt-in %d KiB, clusters %d\n", dev, info.cc_major,
              info.cc_minor, info.sm_count, info.l2_bytes / 1024, info.smem_optin / 1024, info.cluster_launch);
  std::mt19937 rng(1234);

  const DivTuning tunings[] = {{0, -1, 0}, {1, 0, 0}, {1, 1, 0}, {2, 1, 0},
                               {4, 1, 0}, {8, 1, 0}, {4, 0, 0}, {1, 1, 128}};
  for (int kind = 0; kind < 4; ++kind) {
    for (const DivTuning& t : tunings) {
      check_divergence<float>(rng, 6, 6, 4096, kind, false, true, t, "f32");
      check_divergence<__nv_bfloat16>(rng, 3, 7, 4104, kind, true, true, t, "bf16");
    }
    // Scalar path (V not a multiple of the vector width), no mask; a realistic vocabulary.
    check_divergence<__nv_bfloat16>(rng, 5, 5, 1003, kind, false, false, DivTuning{}, "bf16");
    check_divergence<__nv_bfloat16>(rng, 2, 4, 32064, kind, true, false, DivTuning{}, "bf16");
    check_divergence<float>(rng, 3, 3, 32064, kind, false, false, DivTuning{}, "f32");
  }
  for (int step = 0; step <= 4; ++step)
    for (int norm = 0; norm <= 3; ++norm) {
      check_adv_step(rng, 3, 37, 256, step, norm, false);
      check_adv_step(rng, 2, 19, 250, step, norm, true);  // scalar path, in place
    }
  check_perturb(rng, 33, 512);
  check_perturb(rng, 7, 250);
  std::printf("%d cases, %d failures\n", g_cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
