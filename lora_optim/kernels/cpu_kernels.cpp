// CPU kernels of lora_optim: one pass over G for both factor gradients, one pass over W for the
// weight change. Plain C++ with GCC vector extensions (no torch headers, so it compiles in a few
// seconds); loaded through ctypes by lora_optim/kernels/native.py. Each exported function covers
// a row range [row0, row1) in chunks (see "chunks and threads" at the end): threaded by OpenMP
// when built with it, else called one chunk at a time from Python threads.
//
// Storage types: "f32" (float), "bf16" (bfloat16 stored as uint16, computed in float), "f64"
// (double). bf16 results are rounded to nearest even once per element, as torch rounds, except in
// the two bf16 write modes of the weight update: stochastic rounding ("sr": the random bits of an
// element are the xor of one 16-bit word per row and one per column, given) and Kahan compensation
// ("kahan", with a bf16 buffer of W's shape that keeps what rounding dropped).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Vector width and rows per register tile: 4 rows x 4 vectors of accumulators fill half of
// AVX-512's 32 registers; with 16 AVX2 registers 2 rows leave room for the operands.
#if defined(__AVX512F__)
#define LO_VBYTES 64
#define LO_ROW_TILE 4
#else
#define LO_VBYTES 32
#define LO_ROW_TILE 2
#endif

namespace {

template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(LO_VBYTES)));
  static constexpr int lanes = LO_VBYTES / int(sizeof(T));
};

typedef uint16_t vh_t __attribute__((vector_size(LO_VBYTES / 2)));
typedef uint32_t vu_t __attribute__((vector_size(LO_VBYTES)));
typedef float vf_t __attribute__((vector_size(LO_VBYTES)));

template <class V, class S>
inline V load_raw(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V, class S>
inline void store_raw(S* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;  // torch's NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Storage policies: element type S in memory, compute type C, vector loads and stores.
struct F32 {
  typedef float S;
  typedef float C;
  typedef Vec<float>::type V;
  static V vload(const S* p) { return load_raw<V>(p); }
  static void vstore(S* p, V v) { store_raw(p, v); }
  static C sload(const S* p) { return *p; }
  static void sstore(S* p, C v) { *p = v; }
};

struct F64 {
  typedef double S;
  typedef double C;
  typedef Vec<double>::type V;
  static V vload(const S* p) { return load_raw<V>(p); }
  static void vstore(S* p, V v) { store_raw(p, v); }
  static C sload(const S* p) { return *p; }
  static void sstore(S* p, C v) { *p = v; }
};

struct BF16 {
  typedef uint16_t S;
  typedef float C;
  typedef vf_t V;
  static V vload(const S* p) {
    vh_t h = load_raw<vh_t>(p);
    vu_t u = __builtin_convertvector(h, vu_t) << 16;
    return (V)u;
  }
  static void vstore(S* p, V x) {
    vu_t u = (vu_t)x;
    vu_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    vu_t nan = (vu_t)(x != x);
    rounded = (rounded & ~nan) | (nan & 0x7FC0u);
    store_raw(p, __builtin_convertvector(rounded, vh_t));
  }
  static C sload(const S* p) { return bf16_to_float(*p); }
  static void sstore(S* p, C v) { *p = float_to_bf16(v); }
};

// Pins a loaded vector in a register: without it GCC folds the load into every FMA that uses
// it, and the kernels become load-bound (one load per FMA instead of one per tile row).
template <class V>
inline V in_register(V v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__AVX__)
  asm("" : "+x"(v));
#endif
  return v;
}

template <class C>
inline typename Vec<C>::type cload(const C* p) {
  return load_raw<typename Vec<C>::type>(p);
}

template <class C>
inline void cstore(C* p, typename Vec<C>::type v) {
  store_raw(p, v);
}

template <class V, class C>
inline C hsum(V v) {
  constexpr int lanes = int(sizeof(V) / sizeof(C));
  C total = 0;
  for (int l = 0; l < lanes; ++l) total += v[l];
  return total;
}

// Columns per block so that `rows_resident` rows of `m` compute values stay in L2 (~256 KiB).
inline int64_t column_block(int64_t m, int64_t rows_resident, int64_t elem, int64_t multiple) {
  int64_t jb = (int64_t(256) * 1024) / std::max<int64_t>(1, rows_resident * elem);
  jb = std::max<int64_t>(jb, 4 * multiple);
  jb -= jb % multiple;
  return jb >= m ? m : jb;
}

// ---------------------------------------------------------------- lora: projections
// gA[i, k] = sum_j G[i, j] B[k, j] (overwritten for rows i in [row0, row1));
// gB[k, j] += sum_{i in [row0, row1)} A[i, k] G[i, j].

template <class St, int RT, int KT>
inline void project_tile(const typename St::S* G, int64_t ldg, int64_t i, int64_t j0, int64_t j1, int64_t m,
                         int64_t r, int64_t k0, const typename St::C* A, const typename St::C* B,
                         typename St::C* gA, typename St::C* gB) {
  typedef typename St::C C;
  typedef typename St::V V;
  constexpr int L = Vec<C>::lanes;
  V acc[RT][KT];
  C a[RT][KT];
  C tail[RT][KT];
  const typename St::S* rows[RT];
  for (int rr = 0; rr < RT; ++rr) {
    rows[rr] = G + (i + rr) * ldg;
    for (int kk = 0; kk < KT; ++kk) {
      acc[rr][kk] = V{};
      tail[rr][kk] = 0;
      a[rr][kk] = A[(i + rr) * r + k0 + kk];
    }
  }
  int64_t j = j0;
  for (; j + L <= j1; j += L) {
    V g[RT];
    for (int rr = 0; rr < RT; ++rr) g[rr] = St::vload(rows[rr] + j);
    for (int kk = 0; kk < KT; ++kk) {
      const C* bp = B + (k0 + kk) * m + j;
      C* gbp = gB + (k0 + kk) * m + j;
      V b = in_register(cload(bp));
      V gb = cload(gbp);
      for (int rr = 0; rr < RT; ++rr) {
        acc[rr][kk] += g[rr] * b;
        gb += g[rr] * a[rr][kk];
      }
      cstore(gbp, gb);
    }
  }
  for (; j < j1; ++j) {
    C g[RT];
    for (int rr = 0; rr < RT; ++rr) g[rr] = St::sload(rows[rr] + j);
    for (int kk = 0; kk < KT; ++kk) {
      C b = B[(k0 + kk) * m + j];
      C gb = gB[(k0 + kk) * m + j];
      for (int rr = 0; rr < RT; ++rr) {
        tail[rr][kk] += g[rr] * b;
        gb += g[rr] * a[rr][kk];
      }
      gB[(k0 + kk) * m + j] = gb;
    }
  }
  for (int rr = 0; rr < RT; ++rr)
    for (int kk = 0; kk < KT; ++kk) gA[(i + rr) * r + k0 + kk] += hsum<V, C>(acc[rr][kk]) + tail[rr][kk];
}

template <class St, int RT>
inline void project_rows_of_tile(const typename St::S* G, int64_t ldg, int64_t i, int64_t j0, int64_t j1,
                                 int64_t m, int64_t r, const typename St::C* A, const typename St::C* B,
                                 typename St::C* gA, typename St::C* gB) {
  constexpr int KT = 4;
  int64_t k0 = 0;
  for (; k0 + KT <= r; k0 += KT) project_tile<St, RT, KT>(G, ldg, i, j0, j1, m, r, k0, A, B, gA, gB);
  for (; k0 < r; ++k0) project_tile<St, RT, 1>(G, ldg, i, j0, j1, m, r, k0, A, B, gA, gB);
}

template <class St>
void project(const typename St::S* G, int64_t ldg, int64_t row0, int64_t row1, int64_t m, int64_t r,
             const typename St::C* A, const typename St::C* B, typename St::C* gA, typename St::C* gB) {
  typedef typename St::C C;
  constexpr int RT = LO_ROW_TILE;
  for (int64_t i = row0; i < row1; ++i)
    for (int64_t k = 0; k < r; ++k) gA[i * r + k] = 0;
  const int64_t jb = column_block(m, 2 * r, sizeof(C), Vec<C>::lanes);
  for (int64_t j0 = 0; j0 < m; j0 += jb) {
    const int64_t j1 = std::min(m, j0 + jb);
    int64_t i = row0;
    for (; i + RT <= row1; i += RT) project_rows_of_tile<St, RT>(G, ldg, i, j0, j1, m, r, A, B, gA, gB);
    for (; i < row1; ++i) project_rows_of_tile<St, 1>(G, ldg, i, j0, j1, m, r, A, B, gA, gB);
  }
}

// ---------------------------------------------------------------- write policies
// How the update kernel stores W + delta: `vec` for one vector of lanes at row i, columns
// [j, j + lanes), `one` for one element. Nearest works for every storage type; the others are for
// bf16 weights with float compute.

struct NearestWrite {
  template <class St>
  void vec(typename St::S* wp, typename St::V delta, int64_t, int64_t) const {
    typename St::V w = St::vload(wp);
    w += delta;
    St::vstore(wp, w);
  }
  template <class St>
  void one(typename St::S* wp, typename St::C delta, int64_t, int64_t) const {
    St::sstore(wp, St::sload(wp) + delta);
  }
};

// Stochastic rounding of float x to bf16: add 16 random bits below bf16's mantissa to the bit
// pattern and truncate, so the magnitude rounds up with probability (dropped bits) / 2^16.
// The bits of element (i, j) are row_bits[i] ^ column_bits[j] (16-bit words hashed in torch ops by
// lora_optim.precision.rounding_bits from the key of the write, the global row and the column):
// they depend on neither chunks nor threads, and every other path makes the same ones.
struct StochasticWrite {
  const int32_t* row_bits;
  const int32_t* column_bits;

  static vu_t round_bits(vf_t x, vu_t noise) {
    vu_t up = ((vu_t)x + noise) >> 16;
    vu_t nan = (vu_t)(x != x);
    return (up & ~nan) | (nan & 0x7FC0u);
  }

  template <class St>
  void vec(uint16_t* wp, vf_t delta, int64_t i, int64_t j) const {
    vf_t x = BF16::vload(wp) + delta;
    vu_t noise = load_raw<vu_t>(column_bits + j) ^ uint32_t(row_bits[i]);
    store_raw(wp, __builtin_convertvector(round_bits(x, noise), vh_t));
  }
  template <class St>
  void one(uint16_t* wp, float delta, int64_t i, int64_t j) const {
    float x = bf16_to_float(*wp) + delta;
    if (x != x) {
      *wp = 0x7FC0;
      return;
    }
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    uint32_t noise = uint32_t(column_bits[j] ^ row_bits[i]) & 0xFFFFu;
    *wp = uint16_t((u + noise) >> 16);
  }
};

// Kahan / error feedback with a bf16 buffer c of W's shape: x = W + (c + delta) in float,
// W' = round(x), c' = round(x - W') (x - W' is exact in float: W' and x are within an ulp).
struct CompensatedWrite {
  uint16_t* c;
  int64_t ldc;

  template <class St>
  void vec(uint16_t* wp, vf_t delta, int64_t i, int64_t j) const {
    uint16_t* cp = c + i * ldc + j;
    vf_t x = BF16::vload(wp) + (BF16::vload(cp) + delta);
    BF16::vstore(wp, x);
    BF16::vstore(cp, x - BF16::vload(wp));
  }
  template <class St>
  void one(uint16_t* wp, float delta, int64_t i, int64_t j) const {
    uint16_t* cp = c + i * ldc + j;
    float x = bf16_to_float(*wp) + (bf16_to_float(*cp) + delta);
    *wp = float_to_bf16(x);
    *cp = float_to_bf16(x - bf16_to_float(*wp));
  }
};

// ---------------------------------------------------------------- lora: weight change
// W[i, j] <- round(W[i, j] + scale * sum_k Lf[i, k] R[k, j]) for rows i in [row0, row1).

template <class St, int RT, int VT, class Wr>
inline void update_tile(typename St::S* W, int64_t ldw, int64_t i, int64_t j, int64_t m, int64_t K,
                        const typename St::C* Lf, const typename St::C* R, typename St::C scale, const Wr& write) {
  typedef typename St::C C;
  typedef typename St::V V;
  constexpr int L = Vec<C>::lanes;
  V acc[RT][VT];
  for (int rr = 0; rr < RT; ++rr)
    for (int v = 0; v < VT; ++v) acc[rr][v] = V{};
  // The next tile of W: the hardware prefetcher alone leaves this loop waiting on memory.
  for (int rr = 0; rr < RT; ++rr)
    for (int64_t off = 0; off < VT * L; off += 64 / int64_t(sizeof(typename St::S)))
      __builtin_prefetch(W + (i + rr) * ldw + j + VT * L + off, 1, 3);
  for (int64_t k = 0; k < K; ++k) {
    V rv[VT];
    for (int v = 0; v < VT; ++v) rv[v] = in_register(cload(R + k * m + j + v * L));
    for (int rr = 0; rr < RT; ++rr) {
      const C l = Lf[(i + rr) * K + k];
      for (int v = 0; v < VT; ++v) acc[rr][v] += l * rv[v];
    }
  }
  for (int rr = 0; rr < RT; ++rr)
    for (int v = 0; v < VT; ++v)
      write.template vec<St>(W + (i + rr) * ldw + j + v * L, scale * acc[rr][v], i + rr, j + v * L);
}

template <class St, int RT, class Wr>
inline void update_row_tile(typename St::S* W, int64_t ldw, int64_t i, int64_t j0, int64_t j1, int64_t m,
                            int64_t K, const typename St::C* Lf, const typename St::C* R, typename St::C scale,
                            const Wr& write) {
  typedef typename St::C C;
  constexpr int L = Vec<C>::lanes;
  constexpr int VT = 4;
  int64_t j = j0;
  for (; j + VT * L <= j1; j += VT * L) update_tile<St, RT, VT>(W, ldw, i, j, m, K, Lf, R, scale, write);
  for (; j + L <= j1; j += L) update_tile<St, RT, 1>(W, ldw, i, j, m, K, Lf, R, scale, write);
  for (; j < j1; ++j)
    for (int rr = 0; rr < RT; ++rr) {
      C total = 0;
      for (int64_t k = 0; k < K; ++k) total += Lf[(i + rr) * K + k] * R[k * m + j];
      write.template one<St>(W + (i + rr) * ldw + j, scale * total, i + rr, j);
    }
}

template <class St, class Wr = NearestWrite>
void update(typename St::S* W, int64_t ldw, int64_t row0, int64_t row1, int64_t m, int64_t K,
            const typename St::C* Lf, const typename St::C* R, double scale, const Wr& write = Wr()) {
  typedef typename St::C C;
  constexpr int RT = LO_ROW_TILE;
  const int64_t jb = column_block(m, K, sizeof(C), 4 * Vec<C>::lanes);
  for (int64_t j0 = 0; j0 < m; j0 += jb) {
    const int64_t j1 = std::min(m, j0 + jb);
    int64_t i = row0;
    for (; i + RT <= row1; i += RT) update_row_tile<St, RT>(W, ldw, i, j0, j1, m, K, Lf, R, C(scale), write);
    for (; i < row1; ++i) update_row_tile<St, 1>(W, ldw, i, j0, j1, m, K, Lf, R, C(scale), write);
  }
}

// ---------------------------------------------------------------- additive
// fold: gA[i, k] = sum_{j = k mod r} G[i, j] (overwritten for rows in range);
//       gB[k, j] += sum_{i in range, i = k mod r} G[i, j].
// spread: W[i, j] <- round(W[i, j] + scale * (dA[i, j mod r] + dB[i mod r, j])).
// Vector loops run over chunks of P = lcm(r, lanes) columns, so lane l of the p-th vector of a
// chunk always belongs to factor column (p * lanes + l) mod r.

inline int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Column sums of one row for the vector part [j0, j1) (j1 - j0 a multiple of NV * L), with the
// NV accumulators of a period in registers and U periods in flight: a single accumulator in
// memory would make every iteration wait on the previous one's store.
template <class St, int NV>
inline void fold_row_registers(const typename St::S* g, typename St::C* gbrow, int64_t j0, int64_t j1,
                               typename St::C* acc_out) {
  typedef typename St::C C;
  typedef typename St::V V;
  constexpr int L = Vec<C>::lanes;
  constexpr int U = NV >= 4 ? 1 : 4 / NV;
  constexpr int64_t P = int64_t(NV) * L;
  V acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] = V{};
  int64_t j = j0;
  for (; j + U * P <= j1; j += U * P)
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NV; ++v) {
        const int64_t at = j + u * P + v * L;
        V gv = St::vload(g + at);
        acc[u][v] += gv;
        cstore(gbrow + at, cload(gbrow + at) + gv);
      }
  for (; j + P <= j1; j += P)
    for (int v = 0; v < NV; ++v) {
      const int64_t at = j + v * L;
      V gv = St::vload(g + at);
      acc[0][v] += gv;
      cstore(gbrow + at, cload(gbrow + at) + gv);
    }
  for (int v = 0; v < NV; ++v) {
    V total = acc[0][v];
    for (int u = 1; u < U; ++u) total += acc[u][v];
    cstore(acc_out + v * L, total);
  }
}

template <class St>
void fold(const typename St::S* G, int64_t ldg, int64_t row0, int64_t row1, int64_t m, int64_t r,
          typename St::C* gA, typename St::C* gB) {
  typedef typename St::C C;
  typedef typename St::V V;
  constexpr int L = Vec<C>::lanes;
  const int64_t P = r / gcd64(r, L) * L;
  const int64_t NV = P / L;
  const int64_t vector_end = m / P * P;
  std::vector<C> partial(P);
  C* acc = partial.data();
  // Rows in order: G streams from memory (visiting rows by i mod r keeps a row of gB in L1
  // but breaks the stream, measured slower).
  for (int64_t i = row0; i < row1; ++i) {
    const typename St::S* g = G + i * ldg;
    C* gbrow = gB + (i % r) * m;
    C* garow = gA + i * r;
    switch (NV) {
      case 1: fold_row_registers<St, 1>(g, gbrow, 0, vector_end, acc); break;
      case 2: fold_row_registers<St, 2>(g, gbrow, 0, vector_end, acc); break;
      case 3: fold_row_registers<St, 3>(g, gbrow, 0, vector_end, acc); break;
      case 4: fold_row_registers<St, 4>(g, gbrow, 0, vector_end, acc); break;
      default: {  // NV >= 5 accumulators in memory: independent chains, no stall
        std::fill(partial.begin(), partial.end(), C(0));
        for (int64_t j = 0; j < vector_end; j += P)
          for (int64_t p = 0; p < P; p += L) {
            V gv = St::vload(g + j + p);
            cstore(acc + p, cload(acc + p) + gv);
            cstore(gbrow + j + p, cload(gbrow + j + p) + gv);
          }
      }
    }
    for (int64_t col = 0; col < r; ++col) garow[col] = 0;
    for (int64_t p = 0; p < P; ++p) garow[p % r] += acc[p];
    for (int64_t j = vector_end; j < m; ++j) {
      C gs = St::sload(g + j);
      garow[j % r] += gs;
      gbrow[j] += gs;
    }
  }
}

template <class St>
void spread(typename St::S* W, int64_t ldw, int64_t row0, int64_t row1, int64_t m, int64_t r,
            const typename St::C* dA, const typename St::C* dB, double scale_d) {
  typedef typename St::C C;
  typedef typename St::V V;
  constexpr int L = Vec<C>::lanes;
  const C scale = C(scale_d);
  const int64_t P = r / gcd64(r, L) * L;
  const int64_t vector_end = m / P * P;
  std::vector<C> pattern(P);
  C* pat = pattern.data();
  for (int64_t i = row0; i < row1; ++i) {
    typename St::S* w = W + i * ldw;
    const C* arow = dA + i * r;
    const C* brow = dB + (i % r) * m;
    for (int64_t p = 0; p < P; ++p) pat[p] = arow[p % r];
    for (int64_t j = 0; j < vector_end; j += P)
      for (int64_t p = 0; p < P; p += L) {
        V wv = St::vload(w + j + p);
        wv += scale * (cload(pat + p) + cload(brow + j + p));
        St::vstore(w + j + p, wv);
      }
    for (int64_t j = vector_end; j < m; ++j) St::sstore(w + j, St::sload(w + j) + scale * (arow[j % r] + brow[j]));
  }
}

// ---------------------------------------------------------------- chunks and threads
// Rows [row0, row1) are cut into chunks of chunk_rows rows; chunk c (counted from row0) is one
// task. Reductions write a partial sum per chunk (partials + c * r * m, zeroed here), so the result
// does not depend on which thread ran which chunk. With OpenMP the chunks are handed out from
// an atomic counter inside one parallel region of `threads` threads; the library shares the
// process's libgomp (torch's, already loaded), hence torch's thread pool and thread count.

template <class F>
void for_each_chunk(int64_t row0, int64_t row1, int64_t chunk_rows, int threads, const F& task) {
  const int64_t chunks = (row1 - row0 + chunk_rows - 1) / chunk_rows;
  int64_t next = 0;
  (void)threads;  // unused without OpenMP
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && chunks > 1)
#endif
  {
    for (;;) {
      const int64_t c = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (c >= chunks) break;
      task(c, row0 + c * chunk_rows, std::min(row1, row0 + (c + 1) * chunk_rows));
    }
  }
}

}  // namespace

#define LO_EXPORT extern "C" __attribute__((visibility("default")))

// Bumped whenever a signature changes; native.py checks it.
LO_EXPORT int lo_abi_version() { return 4; }
LO_EXPORT int lo_vector_bytes() { return LO_VBYTES; }
LO_EXPORT int lo_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

#define LO_DEFINE(SUFFIX, ST)                                                                              \
  LO_EXPORT void lo_project_##SUFFIX(const void* G, int64_t ldg, int64_t row0, int64_t row1, int64_t m,    \
                                     int64_t r, const void* A, const void* B, void* gA, void* partials,    \
                                     int64_t chunk_rows, int threads) {                                    \
    for_each_chunk(row0, row1, chunk_rows, threads, [&](int64_t c, int64_t a, int64_t b) {                 \
      ST::C* partial = (ST::C*)partials + c * r * m;                                                       \
      std::memset(partial, 0, sizeof(ST::C) * r * m);                                                      \
      project<ST>((const ST::S*)G, ldg, a, b, m, r, (const ST::C*)A, (const ST::C*)B, (ST::C*)gA, partial); \
    });                                                                                                    \
  }                                                                                                        \
  LO_EXPORT void lo_update_##SUFFIX(void* W, int64_t ldw, int64_t row0, int64_t row1, int64_t m,          \
                                    int64_t K, const void* Lf, const void* R, double scale,                \
                                    int64_t chunk_rows, int threads) {                                     \
    for_each_chunk(row0, row1, chunk_rows, threads, [&](int64_t, int64_t a, int64_t b) {                   \
      update<ST>((ST::S*)W, ldw, a, b, m, K, (const ST::C*)Lf, (const ST::C*)R, scale);                    \
    });                                                                                                    \
  }                                                                                                        \
  LO_EXPORT void lo_fold_##SUFFIX(const void* G, int64_t ldg, int64_t row0, int64_t row1, int64_t m,      \
                                  int64_t r, void* gA, void* partials, int64_t chunk_rows, int threads) {  \
    for_each_chunk(row0, row1, chunk_rows, threads, [&](int64_t c, int64_t a, int64_t b) {                 \
      ST::C* partial = (ST::C*)partials + c * r * m;                                                       \
      std::memset(partial, 0, sizeof(ST::C) * r * m);                                                      \
      fold<ST>((const ST::S*)G, ldg, a, b, m, r, (ST::C*)gA, partial);                                     \
    });                                                                                                    \
  }                                                                                                        \
  LO_EXPORT void lo_spread_##SUFFIX(void* W, int64_t ldw, int64_t row0, int64_t row1, int64_t m,          \
                                    int64_t r, const void* dA, const void* dB, double scale,               \
                                    int64_t chunk_rows, int threads) {                                     \
    for_each_chunk(row0, row1, chunk_rows, threads, [&](int64_t, int64_t a, int64_t b) {                   \
      spread<ST>((ST::S*)W, ldw, a, b, m, r, (const ST::C*)dA, (const ST::C*)dB, scale);                   \
    });                                                                                                    \
  }

LO_DEFINE(f32, F32)
LO_DEFINE(bf16, BF16)
LO_DEFINE(f64, F64)

// The bf16 write modes of the weight update (float compute): stochastic rounding with the random
// words of the rows and of the columns (int32 vectors holding 16 bits each), and Kahan
// compensation with a bf16 buffer c.
LO_EXPORT void lo_update_sr_bf16(void* W, int64_t ldw, int64_t row0, int64_t row1, int64_t m, int64_t K,
                                 const void* Lf, const void* R, double scale, const void* row_bits,
                                 const void* column_bits, int64_t chunk_rows, int threads) {
  const StochasticWrite write{(const int32_t*)row_bits, (const int32_t*)column_bits};
  for_each_chunk(row0, row1, chunk_rows, threads, [&](int64_t, int64_t a, int64_t b) {
    update<BF16>((uint16_t*)W, ldw, a, b, m, K, (const float*)Lf, (const float*)R, scale, write);
  });
}

LO_EXPORT void lo_update_kahan_bf16(void* W, int64_t ldw, int64_t row0, int64_t row1, int64_t m, int64_t K,
                                    const void* Lf, const void* R, double scale, void* c, int64_t ldc,
                                    int64_t chunk_rows, int threads) {
  const CompensatedWrite write{(uint16_t*)c, ldc};
  for_each_chunk(row0, row1, chunk_rows, threads, [&](int64_t, int64_t a, int64_t b) {
    update<BF16>((uint16_t*)W, ldw, a, b, m, K, (const float*)Lf, (const float*)R, scale, write);
  });
}
