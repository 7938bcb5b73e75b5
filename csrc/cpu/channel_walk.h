// The vector plumbing and the channel walk shared by the CPU loops, compiled once per CPU
// capability (the including .cpp defines CPU_CAPABILITY, the namespace of its vector code).
//
// A dense tensor is walked as its flat memory in runs: a run of one channel (the rest of an
// NCHW-like plane: parameters broadcast) or of consecutive channels (the rest of a
// channels-last row: parameters loaded as vectors); without streaming stores a run ends
// with a full vector overlapping the one before, not a scalar remainder (walk_run). Planes
// are walked plane by plane (walk_planes), except with streaming stores, which need
// aligned outputs: then planes shorter than kSmallPlane are walked as one flat stream of
// full vectors whose lane groups blend the parameters of the two channels they span, so
// short planes pay no per-plane remainder. Outputs never alias inputs. An Op supplies
//   template <bool kStream> void step(int64_t k, const V* mean, const V* scale, const V* shift)
//     — Traits::kStep elements at flat offset k, parameters as Traits::kParts vectors;
//   void scalar(int64_t k, acc_t mean, acc_t scale, acc_t shift)
//   bool aligned(int64_t k)   — may outputs at k take aligned (non-temporal) stores?
#pragma once

// A plain compile of a *_kernel.cpp (no capability flags from setup.py) is the baseline build.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif

#include "dispatch.h"
#include "kernel_problem.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define FROZENNORM_X86_SIMD 1
#include <immintrin.h>
#endif

// For what runs per vector or per run (an Op's step, the conversions, walk_run): GCC left the
// fused epilogues' step out of line in some walkers (a call per vector, its vectors passed in
// memory: 3-5x slower on channels-last rows), and a call per short plane costs ~25 % on 7x7
// maps: FROZENNORM_ALWAYS_INLINE (rules.h).

namespace frozennorm::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// This build, from the flags it was compiled with (setup.py: CPU_CAPABILITY_* and -m...).
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
constexpr Capability kThisCapability = Capability::kAVX512BF16;
#elif defined(CPU_CAPABILITY_AVX512)
constexpr Capability kThisCapability = Capability::kAVX512;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr Capability kThisCapability = Capability::kAVX2;
#else
constexpr Capability kThisCapability = Capability::kDefault;
#endif

// Registers this build's loops (see dispatch.h) while the library loads. The registering
// initializer only passes a constant and an address: no instruction of this build's
// capability runs before the CPU has been checked.
inline bool register_this_build(const Kernels& loops) {
  return register_kernels(kThisCapability, &loops);
}

// Non-temporal stores take whole vectors at an address aligned to their width.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
#else
constexpr int64_t kStreamAlign = 32;
#endif
// A run whose outputs may start unaligned takes streaming stores only from this many
// elements on: enough to amortise its scalar start and end.
constexpr int64_t kMinStreamRun = 8 * kStreamAlign;
constexpr int64_t kSmallPlane = 256;

// a * b + c, rounded once where the build has FMA (as the vector path's fmadd is).
template <typename T>
inline T fma_scalar(T a, T b, T c) {
#if defined(FROZENNORM_X86_SIMD)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Non-temporal store of one vector to an address aligned to its width.
#if defined(FROZENNORM_X86_SIMD)
#if defined(CPU_CAPABILITY_AVX512)
using StreamBits = __m512i;
inline void stream_bits(StreamBits* p, StreamBits v) {
  _mm512_stream_si512(p, v);
}
#else
using StreamBits = __m256i;
inline void stream_bits(StreamBits* p, StreamBits v) {
  _mm256_stream_si256(p, v);
}
#endif
template <typename T>
inline void stream_store(T* p, const Vectorized<T>& v) {
  static_assert(sizeof(v) == sizeof(StreamBits), "one register per vector");
  StreamBits bits;
  std::memcpy(&bits, &v, sizeof(bits));
  stream_bits(reinterpret_cast<StreamBits*>(p), bits);
}
inline void stream_fence() {
  _mm_sfence();
}
#else
template <typename T, typename V>
inline void stream_store(T* p, const V& v) {
  v.store(p);
}
inline void stream_fence() {}
#endif

// Two float vectors rounded (to nearest even) to one vector of T (float16 or bfloat16).
template <typename T>
FROZENNORM_ALWAYS_INLINE Vectorized<T> from_float(const Vectorized<float>& lo,
                                                  const Vectorized<float>& hi) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // One instruction (VCVTNE2PS2BF16) instead of at::vec's integer rounding. It flushes
    // subnormal floats to zero, whose exact rounding is a bfloat16 subnormal: vectors with
    // one (rare) take at::vec's rounding (inlined: a call, even on the cold path, costs
    // ~15 % on cache-resident planes).
    if (__builtin_expect(_mm512_kortestz(_mm512_fpclass_ps_mask(lo, 0x20),
                                         _mm512_fpclass_ps_mask(hi, 0x20)), 1)) {
      return Vectorized<T>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
#endif
  return at::vec::convert_from_float<T>(lo, hi);
}

// The float values of one vector of T (float16 or bfloat16) at p, as two float vectors.
template <typename T>
FROZENNORM_ALWAYS_INLINE void to_float(const T* p, Vectorized<float>* out) {
#if defined(FROZENNORM_X86_SIMD)
  // Each half widened straight from memory (at::vec loads the whole vector, then splits it).
  for (int part = 0; part < 2; ++part) {
    const T* q = p + part * Vectorized<float>::size();
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      out[part] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      out[part] = _mm512_cvtph_ps(h);
    }
#else
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      out[part] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      out[part] = _mm256_cvtph_ps(h);
    }
#endif
  }
#else
  std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
#endif
}

// kStep elements of scalar_t as kParts vectors of acc_t (kVectorized == false: scalar only).
template <typename scalar_t, typename acc_t, typename = void>
struct VecIO {
  static constexpr bool kVectorized = false;
  using AccVec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 1;
  static constexpr int kParts = 1;
};

template <typename T>
struct VecIO<T, T, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, double>>> {
  static constexpr bool kVectorized = true;
  using AccVec = Vectorized<T>;
  static constexpr int64_t kStep = AccVec::size();
  static constexpr int kParts = 1;
  FROZENNORM_ALWAYS_INLINE static void load(const T* p, AccVec* out) {
    out[0] = AccVec::loadu(p);
  }
  template <bool kStream>
  FROZENNORM_ALWAYS_INLINE static void store(T* p, const AccVec* in) {
    if constexpr (kStream) {
      stream_store(p, in[0]);
    } else {
      in[0].store(p);
    }
  }
  static void round(AccVec*) {}  // already the data dtype
};

template <typename T>
struct VecIO<
    T,
    float,
    std::enable_if_t<std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>>> {
  static constexpr bool kVectorized = true;
  using AccVec = Vectorized<float>;
  static constexpr int64_t kStep = Vectorized<T>::size();
  static constexpr int kParts = kStep / AccVec::size();
  static_assert(kParts == 2, "a reduced-precision vector converts to two float vectors");
  FROZENNORM_ALWAYS_INLINE static void load(const T* p, AccVec* out) {
    to_float(p, out);
  }
  template <bool kStream>
  FROZENNORM_ALWAYS_INLINE static void store(T* p, const AccVec* in) {
    const auto v = from_float<T>(in[0], in[1]);
    if constexpr (kStream) {
      stream_store(p, v);
    } else {
      v.store(p);
    }
  }
  // Rounds to T and back: the value the unfused op would have stored.
  FROZENNORM_ALWAYS_INLINE static void round(AccVec* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(from_float<T>(v[0], v[1]));
  }
};

// The value a scalar_t holding `v` has, in acc_t.
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// Channel c's value of a per-channel mean or shift: zero for an Op without them
// (Op::kShift false: the backward's out = in * scale, whose mean and shift are null).
template <typename Op>
inline typename Op::acc_t param(const typename Op::acc_t* p, int64_t c) {
  if constexpr (Op::kShift) {
    return p[c];
  } else {
    return typename Op::acc_t(0);
  }
}

// The parameters of channels [c, c + kStep) as Op::IO::kParts vectors each (a mean and
// shift only where the Op has them: the vectors keep their values otherwise).
template <typename Op, typename V>
FROZENNORM_ALWAYS_INLINE void load_params(int64_t c, const typename Op::acc_t* mean,
                        const typename Op::acc_t* scale, const typename Op::acc_t* shift, V* m,
                        V* s, V* b) {
  for (int part = 0; part < Op::IO::kParts; ++part) {
    const int64_t ch = c + part * V::size();
    s[part] = V::loadu(scale + ch);
    if constexpr (Op::kShift) {
      m[part] = V::loadu(mean + ch);
      b[part] = V::loadu(shift + ch);
    }
  }
}

// The walkers take the Op by value: its data pointers are then locals the compiler keeps
// in registers. Through a reference they are reloaded after every vector store (the
// intrinsics' stores may alias anything), which costs ~1.5x on cache-resident tensors.
//
// Walks one run [k, k + n): kContig — element k + j has channel c + j; otherwise all have c.
// Without streaming stores a run of at least kStep elements ends with a full vector that
// overlaps the one before (outputs never alias inputs, so the elements in the overlap are
// written twice with the same values): no scalar remainder, whatever the run length.
template <bool kContig, bool kStream, typename Op>
FROZENNORM_ALWAYS_INLINE void walk_run(const Op op, int64_t k, int64_t n, int64_t c,
                                       const typename Op::acc_t* mean,
                                       const typename Op::acc_t* scale,
                                       const typename Op::acc_t* shift) {
  using IO = typename Op::IO;
  auto scalar = [&](int64_t j) {
    const int64_t ch = kContig ? c + j : c;
    op.scalar(k + j, param<Op>(mean, ch), scale[ch], param<Op>(shift, ch));
  };
  int64_t j = 0;
  if constexpr (IO::kVectorized) {
    using V = typename IO::AccVec;
    if constexpr (kStream) {  // scalar until the outputs are aligned for streaming stores
      while (j < n && !op.aligned(k + j)) scalar(j++);
    }
    const V bm(param<Op>(mean, c)), bs(scale[c]), bb(param<Op>(shift, c));
    V m[IO::kParts], s[IO::kParts], b[IO::kParts];
    for (int part = 0; part < IO::kParts; ++part) {
      m[part] = bm;
      s[part] = bs;
      b[part] = bb;
    }
    auto step = [&](int64_t at) {  // kStep elements at k + at
      if constexpr (kContig) load_params<Op>(c + at, mean, scale, shift, m, s, b);
      op.template step<kStream>(k + at, m, s, b);
    };
    for (; j + IO::kStep <= n; j += IO::kStep) step(j);
    if (!kStream && j < n && n >= IO::kStep) {
      step(n - IO::kStep);
      return;
    }
  }
  for (; j < n; ++j) scalar(j);
}

// Walks [k, k + n) over consecutive short planes (V::size() <= inner < kSmallPlane) as full
// vectors, starting in channel c at position pos of its plane; a lane group spans at most
// two planes, whose parameters are blended.
template <bool kStream, typename Op>
void walk_small_planes(const Op op, int64_t k, int64_t n, int64_t c, int64_t pos, int64_t inner,
                       int64_t C, const typename Op::acc_t* mean, const typename Op::acc_t* scale,
                       const typename Op::acc_t* shift) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  constexpr int64_t kLanes = V::size();
  auto next = [C](int64_t ch) { return ch + 1 == C ? int64_t{0} : ch + 1; };
  int64_t j = 0;
  auto scalar = [&] {
    op.scalar(k + j, param<Op>(mean, c), scale[c], param<Op>(shift, c));
    ++j;
    if (++pos == inner) {
      pos = 0;
      c = next(c);
    }
  };
  while (j < n && !op.aligned(k + j)) scalar();
  // Branch-free: lanes [0, inner - pos) are in channel c, the rest (if any) in the next
  // one, and the parameters are blended under that mask (a branch on where the plane
  // ends, whose outcome cycles with the plane length, mispredicts on most steps).
  const V lane = V::arange(acc_t(0), acc_t(1));
  V m[IO::kParts], s[IO::kParts], b[IO::kParts];
  for (; j + IO::kStep <= n; j += IO::kStep) {
    for (int part = 0; part < IO::kParts; ++part) {
      const int64_t c2 = next(c);
      const V in_c = lane < V(static_cast<acc_t>(inner - pos));
      m[part] = V::blendv(V(param<Op>(mean, c2)), V(param<Op>(mean, c)), in_c);
      s[part] = V::blendv(V(scale[c2]), V(scale[c]), in_c);
      b[part] = V::blendv(V(param<Op>(shift, c2)), V(param<Op>(shift, c)), in_c);
      pos += kLanes;  // inner >= kLanes: a lane group ends at most one plane further
      if (pos >= inner) {
        pos -= inner;
        c = c2;
      }
    }
    op.template step<kStream>(k + j, m, s, b);
  }
  while (j < n) scalar();
}

// Walks [k, k + n) plane by plane without streaming stores (planes of at least kStep
// elements), starting in channel c at position pos of its plane: each plane's parameters are
// broadcast once and its last vector overlaps the one before, so there is no per-vector
// parameter blending and no scalar remainder whatever the plane length. The whole planes
// between the chunk's partial first and last ones take a loop without the run's length
// tests: ~1/3 fewer instructions per 7x7 plane.
template <typename Op>
void walk_planes(const Op op, int64_t k, int64_t n, int64_t c, int64_t pos, int64_t inner,
                 int64_t C, const typename Op::acc_t* mean, const typename Op::acc_t* scale,
                 const typename Op::acc_t* shift) {
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  auto next = [C](int64_t ch) { return ch + 1 == C ? int64_t{0} : ch + 1; };
  int64_t j = 0;
  if (pos != 0) {  // the rest of the first plane
    j = std::min(inner - pos, n);
    walk_run<false, false>(op, k, j, c, mean, scale, shift);
    c = next(c);
  }
  V m[IO::kParts], s[IO::kParts], b[IO::kParts];
  for (; j + inner <= n; j += inner) {
    for (int part = 0; part < IO::kParts; ++part) {
      m[part] = V(param<Op>(mean, c));
      s[part] = V(scale[c]);
      b[part] = V(param<Op>(shift, c));
    }
    int64_t i = 0;
    for (; i + IO::kStep < inner; i += IO::kStep) op.template step<false>(k + j + i, m, s, b);
    op.template step<false>(k + j + inner - IO::kStep, m, s, b);
    c = next(c);
  }
  if (j < n) walk_run<false, false>(op, k + j, n - j, c, mean, scale, shift);  // the last plane's start
}

// Walks [k, k + n) over whole channels-last rows of C channels (C a multiple of the vector
// step), starting at channel c: one loop over the range, the parameters loaded as vectors at
// the running channel, so short rows pay no per-row setup. Returns how far it got (the
// caller walks the rest run by run: only when streaming stores find outputs misaligned).
// (Loading each channel block's parameters once for several rows, walked block by block,
// measured 1.4-1.5x slower on cache-resident tensors of 6-16 MB: the interleaved rows
// cost more than the parameter loads they save.)
template <bool kStream, typename Op>
int64_t walk_rows(const Op op, int64_t k, int64_t n, int64_t c, int64_t C,
                  const typename Op::acc_t* mean, const typename Op::acc_t* scale,
                  const typename Op::acc_t* shift) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  int64_t j = 0;
  auto scalar = [&] {
    op.scalar(k + j, param<Op>(mean, c), scale[c], param<Op>(shift, c));
    ++j;
    c = c + 1 == C ? 0 : c + 1;
  };
  while (j < n && c % IO::kStep != 0) scalar();  // to a vector boundary of the row
  if (kStream && j < n && !op.aligned(k + j)) return j;
  V m[IO::kParts], s[IO::kParts], b[IO::kParts];
  for (int part = 0; part < IO::kParts; ++part) m[part] = b[part] = V(acc_t(0));
  for (; j + IO::kStep <= n; j += IO::kStep) {
    load_params<Op>(c, mean, scale, shift, m, s, b);
    op.template step<kStream>(k + j, m, s, b);
    c += IO::kStep;
    if (c == C) c = 0;
  }
  while (j < n) scalar();
  return n;
}

// Runs `op` over a DenseProblem's flat range, in parallel.
template <typename Op>
void walk_dense(const DenseProblem& p, const Op& op) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  const auto* mean = static_cast<const acc_t*>(p.mean);
  const auto* scale = static_cast<const acc_t*>(p.scale);
  const auto* shift = static_cast<const acc_t*>(p.shift);
  const int64_t C = p.C, inner = p.inner;
  at::parallel_for(0, p.numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    const int64_t q = begin / inner;
    int64_t c = inner == 1 ? begin % C : q % C;
    int64_t pos = inner == 1 ? 0 : begin - q * inner;  // position in the current plane
    if constexpr (IO::kVectorized) {
      if (inner == 1 && C % IO::kStep == 0) {
        const int64_t done = p.stream
            ? walk_rows<true>(op, begin, end - begin, c, C, mean, scale, shift)
            : walk_rows<false>(op, begin, end - begin, c, C, mean, scale, shift);
        if (p.stream) stream_fence();
        if (done == end - begin) return;
        begin += done;  // misaligned outputs: the rest run by run (below)
        c = begin % C;
      }
      if (!p.stream && inner >= IO::kStep) {
        walk_planes(op, begin, end - begin, c, pos, inner, C, mean, scale, shift);
        return;
      }
      if (inner >= IO::AccVec::size() && inner < kSmallPlane) {
        p.stream ? walk_small_planes<true>(op, begin, end - begin, c, pos, inner, C, mean, scale, shift)
                 : walk_small_planes<false>(op, begin, end - begin, c, pos, inner, C, mean, scale, shift);
        if (p.stream) stream_fence();
        return;
      }
    }
    // Channels-last rows whose starts are all aligned stream at any length (no scalar
    // prologue per row); other runs only when long enough to amortise theirs.
    const bool aligned_rows =
        inner == 1 && (C * static_cast<int64_t>(c10::elementSize(p.data_type))) % kStreamAlign == 0;
    for (int64_t k = begin; k < end;) {
      // a run is the rest of a row of C channels (inner == 1) or of a plane of one channel
      const int64_t len = inner == 1 ? std::min(C - c, end - k) : std::min(inner - pos, end - k);
      const bool stream = p.stream && (aligned_rows || len >= kMinStreamRun);
      if (inner == 1) {
        stream ? walk_run<true, true>(op, k, len, c, mean, scale, shift)
               : walk_run<true, false>(op, k, len, c, mean, scale, shift);
        c = 0;
      } else {
        stream ? walk_run<false, true>(op, k, len, c, mean, scale, shift)
               : walk_run<false, false>(op, k, len, c, mean, scale, shift);
        pos = 0;
        c = c + 1 == C ? 0 : c + 1;
      }
      k += len;
    }
    if (p.stream) stream_fence();
  });
}

template <typename T>
inline bool aligned_at(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0;
}

}  // namespace CPU_CAPABILITY
}  // namespace frozennorm::cpu
