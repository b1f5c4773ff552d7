// One-token decode kernels for the CPU (llamactl/engine/fused_cpu.py calls them through ctypes).
//
// A decode step of a small model spends as long in ~45 tiny torch operators per layer (RMSNorm
// alone is nine, plus casts, rotary, cache writes and attention's widening copies) as in its
// matmuls; these kernels do that work in four calls per layer. Each keeps the eager path's
// arithmetic: fp32 inside, results rounded to the activations' dtype (T) exactly where the
// torch operators round them, so a bf16 step gives the logits of the eager bf16 step to within
// summation order. Plain C++ with no torch headers: it compiles in about a second. Attention
// splits its query heads over `threads` OpenMP threads: torch's own pool, since the library
// links the libgomp torch loaded (build.py); the other kernels are too short to share.
#include <math.h>
#include <stdint.h>
#include <string.h>

namespace {

struct bf16 {
    uint16_t bits;
};

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#ifdef LLAMACTL_F16
inline float widen(_Float16 x) { return (float)x; }
#endif

template <typename T> inline T narrow(float x);
template <> inline float narrow<float>(float x) { return x; }
#ifdef LLAMACTL_F16
template <> inline _Float16 narrow<_Float16>(float x) { return (_Float16)x; }
#endif
template <> inline bf16 narrow<bf16>(float x) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet = (u >> 16) | 0x40u;  // NaN stays NaN
    // A select, not a branch: loops that narrow (SiLU, RMSNorm, rotary) stay vectorised.
    return bf16{(uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded)};
}

constexpr int LANES = 16;  // independent partial sums: the compiler vectorises them without -ffast-math

// 16 floats as one value (GCC / clang vector extensions: AVX-512, AVX2 or NEON, whatever the
// target has); attention's per-key dot products and weighted sums run on these.
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

inline vf vload(const float* p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
inline vf vload(const bf16* p) {
    vh h;
    memcpy(&h, p, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
#ifdef LLAMACTL_F16
typedef _Float16 vhf __attribute__((vector_size(32)));
inline vf vload(const _Float16* p) {
    vhf h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
}
#endif

// The sum of LANES partial sums as a tree (not LANES dependent adds: one per key adds up); x is scratch.
inline float tree_sum(float* x) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) x[l] += x[l + w];
    return x[0];
}

inline float hsum(vf v) {
    float x[LANES];
    memcpy(x, &v, sizeof x);
    return tree_sum(x);
}

// Lane i of the result = the sum of x[i]'s 16 lanes: 16 horizontal sums in 15 shuffle pairs (a tree
// that halves each vector's partial sums and doubles the vectors per register at every level),
// where one sum at a time takes 4 shuffles and a chain of adds per vector.
#if defined(__clang__)
#define LLAMACTL_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t vi __attribute__((vector_size(64)));
#define LLAMACTL_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif
inline vf sum16(const vf* x) {
    vf h[8], q[4], e[2];
    for (int i = 0; i < 8; ++i)  // lanes 0-7: 8 partial sums of x[2i], 8-15: of x[2i+1]
        h[i] = LLAMACTL_SHUFFLE(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               LLAMACTL_SHUFFLE(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)  // 4 lanes each of x[4i..4i+3]
        q[i] = LLAMACTL_SHUFFLE(h[2 * i], h[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               LLAMACTL_SHUFFLE(h[2 * i], h[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)  // 2 lanes each of x[8i..8i+7]
        e[i] = LLAMACTL_SHUFFLE(q[2 * i], q[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               LLAMACTL_SHUFFLE(q[2 * i], q[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return LLAMACTL_SHUFFLE(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           LLAMACTL_SHUFFLE(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#undef LLAMACTL_SHUFFLE

template <typename T> inline float dot(const T* a, const T* b, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; ++l) acc[l] += widen(a[i + l]) * widen(b[i + l]);
    for (; i < n; ++i) acc[0] += widen(a[i]) * widen(b[i]);
    return tree_sum(acc);
}

// max and sum of n floats in LANES independent lanes (a single running value does not vectorise)
inline float lane_max(const float* x, long n) {
    float m[LANES];
    for (int l = 0; l < LANES; ++l) m[l] = -INFINITY;
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; ++l) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
    for (int l = 1; l < LANES; ++l) m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

inline float lane_sum(const float* x, long n) {
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; ++l) acc[l] += x[i + l];
    for (; i < n; ++i) acc[0] += x[i];
    return tree_sum(acc);
}

// e^x to about 2 ulp (Cephes' expf: 2^n times a degree-7 polynomial on |r| <= ln2 / 2) in
// operations the compiler vectorises; libm's expf is a call per value, and attention's softmax
// and SiLU take thousands a layer (floorf vectorises under -fno-trapping-math: build.FLAGS). Clamped
// to the finite floats: e^-87.3 stands in for 0; NaN stays NaN (fmaxf would clamp it to -87.3).
inline float fast_exp(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

// h = x + delta (rounded to T) when delta is given (else h is not written and x is normalised);
// n = round(round(h / rms(h)) * w): Meta's RMSNorm, normalised in fp32 and cast back before the weight.
template <typename T> void rms_norm(const T* x, const T* delta, const T* w, T* h, T* n, int dim, float eps) {
    const T* src = x;
    if (delta) {
        for (int i = 0; i < dim; ++i) h[i] = narrow<T>(widen(x[i]) + widen(delta[i]));
        src = h;
    }
    const float rstd = 1.0f / sqrtf(dot(src, src, dim) / dim + eps);
    for (int i = 0; i < dim; ++i) n[i] = narrow<T>(widen(narrow<T>(widen(src[i]) * rstd)) * widen(w[i]));
}

// qkv [(H+2K)*D], one token: the rotary rotation of its H query and K key heads in place (Meta's
// interleaved pairs; freqs [D/2] (cos, sin) pairs of its position), then its keys and values
// stored at `pos` of the caches kc, vc [K, cap, D].
template <typename T> void rope_store(T* qkv, const float* freqs, T* kc, T* vc, long pos, int H, int K, int D, long cap) {
    for (int head = 0; head < H + K; ++head) {
        T* p = qkv + (long)head * D;
        for (int i = 0; i < D / 2; ++i) {
            const float a = widen(p[2 * i]), b = widen(p[2 * i + 1]), c = freqs[2 * i], s = freqs[2 * i + 1];
            p[2 * i] = narrow<T>(a * c - b * s);
            p[2 * i + 1] = narrow<T>(a * s + b * c);
        }
    }
    for (int kh = 0; kh < K; ++kh) {
        memcpy(kc + ((long)kh * cap + pos) * D, qkv + (long)(H + kh) * D, sizeof(T) * D);
        memcpy(vc + ((long)kh * cap + pos) * D, qkv + (long)(H + K + kh) * D, sizeof(T) * D);
    }
}

// out [H*D] = softmax(q k^T / sqrt(D)) v for the H query heads at the front of qkv over cache
// positions 0..pos; query head h reads kv head h / (H/K) (Meta's repeat_kv). scratch: H * (pos+1)
// floats. One thread reads a head's keys and values at the bandwidth one core gets: a long
// context wants them all.
template <typename T>
void attend(const T* qkv, const T* kc, const T* vc, long pos, int H, int K, int D, long cap, T* out, float* scratch,
            int threads) {
    const int group = H / K;
    const float scale = 1.0f / sqrtf((float)D);
    const int chunks = D / 16;  // whole vectors per head (D % 16 == 0), else the scalar loops
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int h = 0; h < H; ++h) {
        float* scores = scratch + (long)h * (pos + 1);
        const T* q = qkv + (long)h * D;
        const T* keys = kc + (long)(h / group) * cap * D;
        const T* values = vc + (long)(h / group) * cap * D;
        if (D % 16 == 0) {
            vf qv[32];  // D <= 512 (the caller checks)
            for (int j = 0; j < chunks; ++j) qv[j] = vload(q + 16 * j);
            long s = 0;
            for (; s + 16 <= pos + 1; s += 16) {  // 16 keys, then their 16 sums at once
                vf acc[16];
                for (int k = 0; k < 16; ++k) {
                    const T* key = keys + (s + k) * D;
                    acc[k] = qv[0] * vload(key);
                    for (int j = 1; j < chunks; ++j) acc[k] += qv[j] * vload(key + 16 * j);
                }
                const vf block = sum16(acc) * scale;
                memcpy(scores + s, &block, sizeof block);
            }
            for (; s <= pos; ++s) {
                const T* key = keys + s * D;
                vf acc = qv[0] * vload(key);
                for (int j = 1; j < chunks; ++j) acc += qv[j] * vload(key + 16 * j);
                scores[s] = hsum(acc) * scale;
            }
        } else {
            for (long s = 0; s <= pos; ++s) scores[s] = dot(q, keys + s * D, D) * scale;
        }
        const float top = lane_max(scores, pos + 1);
        for (long s = 0; s <= pos; ++s) scores[s] = fast_exp(scores[s] - top);  // a pure map: vectorised
        const float total = lane_sum(scores, pos + 1);
        float acc[512];
        if (D % 16 == 0) {
            vf sum[32] = {};
            for (long s = 0; s <= pos; ++s) {
                const T* v = values + s * D;
                for (int j = 0; j < chunks; ++j) sum[j] += scores[s] * vload(v + 16 * j);
            }
            memcpy(acc, sum, sizeof(float) * D);
        } else {
            for (int d = 0; d < D; ++d) acc[d] = 0;
            for (long s = 0; s <= pos; ++s) {
                const float p = scores[s];
                const T* v = values + s * D;
                for (int d = 0; d < D; ++d) acc[d] += p * widen(v[d]);
            }
        }
        for (int d = 0; d < D; ++d) out[(long)h * D + d] = narrow<T>(acc[d] / total);
    }
}

// out [F] = round(round(silu(g)) * u) for gu = [g | u] [2F]: F.silu(gate) * up as torch rounds it.
template <typename T> void silu_mul(const T* gu, T* out, long F) {
    for (long i = 0; i < F; ++i) {
        const float g = widen(gu[i]);
        out[i] = narrow<T>(widen(narrow<T>(g / (1.0f + fast_exp(-g)))) * widen(gu[F + i]));
    }
}
// bf16 through its bits (GCC does not vectorise loads and stores of the bf16 struct), in chunks
// whose exponentials run in a loop of floats alone: 15 us a call as scalar code (2 x 2048 values a
// layer at 110M), 4.4 us as one vectorised loop, 2.4 us in chunks.
template <> void silu_mul<bf16>(const bf16* gu, bf16* out, long F) {
    const uint16_t* in = (const uint16_t*)gu;
    uint16_t* o = (uint16_t*)out;
    constexpr long CHUNK = 256;
    float g[CHUNK], e[CHUNK];
    for (long i0 = 0; i0 < F; i0 += CHUNK) {
        const long n = F - i0 < CHUNK ? F - i0 : CHUNK;
        for (long i = 0; i < n; ++i) g[i] = widen(bf16{in[i0 + i]});
        for (long i = 0; i < n; ++i) e[i] = fast_exp(-g[i]);
        for (long i = 0; i < n; ++i) {
            const float silu = widen(narrow<bf16>(g[i] / (1.0f + e[i])));
            o[i0 + i] = narrow<bf16>(silu * widen(bf16{in[F + i0 + i]})).bits;
        }
    }
}

}  // namespace

#define LLAMACTL_EXPORT(SUFFIX, T)                                                                          \
    extern "C" void rms_norm_##SUFFIX(const void* x, const void* delta, const void* w, void* h, void* n,   \
                                      int dim, float eps) {                                               \
        rms_norm<T>((const T*)x, (const T*)delta, (const T*)w, (T*)h, (T*)n, dim, eps);                    \
    }                                                                                                     \
    extern "C" void rope_store_##SUFFIX(void* qkv, const float* freqs, void* kc, void* vc, long pos, int H, \
                                        int K, int D, long cap) {                                         \
        rope_store<T>((T*)qkv, freqs, (T*)kc, (T*)vc, pos, H, K, D, cap);                                  \
    }                                                                                                     \
    extern "C" void attend_##SUFFIX(const void* qkv, const void* kc, const void* vc, long pos, int H, int K, \
                                    int D, long cap, void* out, float* scratch, int threads) {            \
        attend<T>((const T*)qkv, (const T*)kc, (const T*)vc, pos, H, K, D, cap, (T*)out, scratch, threads); \
    }                                                                                                     \
    extern "C" void silu_mul_##SUFFIX(const void* gu, void* out, long F) { silu_mul<T>((const T*)gu, (T*)out, F); }

LLAMACTL_EXPORT(f32, float)
LLAMACTL_EXPORT(bf16, bf16)
#ifdef LLAMACTL_F16
LLAMACTL_EXPORT(f16, _Float16)
#endif
