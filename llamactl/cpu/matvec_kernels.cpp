// Matrix-vector products for decode on the CPU: GGUF Q4_0 / Q8_0 weights (and plain fp32 / bf16 ones,
// after them) times a few rows of activations (llamactl/cpu/matvec.py repacks the weights and calls
// these through ctypes).
//
// Arithmetic, as llama.cpp runs Q4_0 / Q8_0: each 32-value block of an activation row is
// quantized to int8 with its own scale (ggml's quantize_row_q8_0: d = amax / 127, q = roundf(x / d)),
// a block's product is an exact int32 dot product of int8 values, scaled in fp32 by the weight's
// fp16 block scale times the activation's. vpdpbusd (AVX512-VNNI: 64 multiply-adds an instruction)
// multiplies unsigned by signed bytes, so the weights enter unsigned: Q4_0's nibbles u (value
// u - 8) as they are, Q8_0's q as q + 128 (q ^ 0x80); offset x the block's activation sum is
// subtracted from the int32 sum, exactly.
//
// Layout (matvec.py's `repack`): rows in groups of 16, one zmm lane per row, so one vpdpbusd does
// 4 values of 16 rows and a block ends in 16 int32 sums, no horizontal reduction:
//   Q8_0 payload [N/16, K/4, 16, 4] int8: (group, 4 values, row, value)
//   Q4_0 payload [N/16, K/8, 16, 4] bytes: values 8s+i in the low nibble, 8s+4+i in the high one
//   scales       [N/16, K/32, 16] fp16
// the same bytes as GGUF's blocks, rearranged (N padded to 16 with zero rows). `dequantize_q*`
// turns that layout back into rows of floats for a prefill's dense matmul.
//
// Threads: torch's own OpenMP runtime (the library links libgomp.so.1 by name, which the dynamic
// loader resolves to the copy torch loaded), so these kernels use torch's threads, not a second
// pool fighting it for the cores. Without AVX512-VNNI the library exports none of these (the
// caller keeps torch's kernels); without OpenMP they run on one thread.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>

namespace {

struct bf16 {
    uint16_t bits;
};
struct f16 {
    uint16_t bits;
};

inline void store(float* y, float v) { *y = v; }
inline void store(bf16* y, float v) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        y->bits = (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    y->bits = (uint16_t)(u >> 16);
}
inline void store(f16* y, float v) { y->bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }

// One activation row in 8 bits: q [K], and per block of 32 its scale d and the sum of its q.
struct QuantRow {
    int8_t* q;
    float* d;
    int32_t* sum;
};

// 16 activations as floats.
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const bf16* x) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline __m512 load16(const f16* x) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)x)); }

// roundf (half away from zero) of 16 floats, exactly: trunc, plus one where the dropped fraction
// is >= 1/2 (adding 0.5 and flooring would round 0.49999997 up).
inline __m512i round_away(__m512 v) {
    const __m512 a = _mm512_abs_ps(v);
    const __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512i r = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0f)));
    const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_sub_epi32(r, negative, _mm512_setzero_si512(), r);
}

template <typename T> void quantize_row(const T* x, long K, QuantRow out) {
    for (long b = 0; b < K / 32; ++b) {
        const __m512 lo = load16(x + b * 32), hi = load16(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        const __m512 scale = _mm512_set1_ps(id);
        const __m512i qlo = round_away(_mm512_mul_ps(lo, scale)), qhi = round_away(_mm512_mul_ps(hi, scale));
        _mm_storeu_si128((__m128i*)(out.q + b * 32), _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128((__m128i*)(out.q + b * 32 + 16), _mm512_cvtepi32_epi8(qhi));
        out.d[b] = d;
        out.sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

constexpr long Q4_PREFETCH = 16384;  // bytes ahead in the weight stream (a prefetch never faults)

// The 16 outputs of one row group for one activation row. Two int32 chains per block halve
// vpdpbusd's latency chain; blocks overlap in the out-of-order window.
template <int BITS> inline __m512 group_dot(const uint8_t* w, const uint16_t* s, QuantRow x, long K) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    __m512 out = _mm512_setzero_ps();
    for (long b = 0; b < K / 32; ++b) {
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        int32_t x4[8];  // the block's activations, 4 at a time
        memcpy(x4, x.q + b * 32, 32);
        if (BITS == 8) {
            const uint8_t* wb = w + b * 8 * 64;
            for (int st = 0; st < 8; st += 2) {
                const __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512(wb + st * 64), flip);
                const __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512(wb + (st + 1) * 64), flip);
                a0 = _mm512_dpbusd_epi32(a0, u0, _mm512_set1_epi32(x4[st]));
                a1 = _mm512_dpbusd_epi32(a1, u1, _mm512_set1_epi32(x4[st + 1]));
            }
        } else {
            const uint8_t* wb = w + b * 4 * 64;
            // Into L2, 16 KiB ahead of this block (past the group's end: the next groups of this
            // thread's range). The hardware prefetcher alone kept q4 at 31 GB/s from DRAM on an AMD
            // EPYC with 2 threads, 40 with this. Q8_0, with half the arithmetic per byte, streams at
            // the DRAM rate already and gained nothing, so it has none.
            for (int st = 0; st < 4; ++st) _mm_prefetch((const char*)(wb + Q4_PREFETCH + st * 64), _MM_HINT_T1);
            for (int st = 0; st < 4; ++st) {
                const __m512i v = _mm512_loadu_si512(wb + st * 64);
                a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, low4), _mm512_set1_epi32(x4[2 * st]));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                                         _mm512_set1_epi32(x4[2 * st + 1]));
            }
        }
        const int32_t offset = (BITS == 8 ? 128 : 8) * x.sum[b];
        const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), _mm512_set1_epi32(offset));
        const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + b * 16)));
        out = _mm512_fmadd_ps(_mm512_mul_ps(ws, _mm512_set1_ps(x.d[b])), _mm512_cvtepi32_ps(dot), out);
    }
    return out;
}

// y [M, N] = x [M, K] @ W.T. Threads split W's row groups; a group meets every activation row
// while it is in L1 / L2.
template <int BITS, typename Tin, typename Tout>
void matvec(const uint8_t* w, const uint16_t* s, const Tin* x, Tout* y, long M, long N, long K, int threads) {
    std::vector<int8_t> q(M * K);
    std::vector<float> d(M * (K / 32));
    std::vector<int32_t> sums(M * (K / 32));
    std::vector<QuantRow> rows(M);
    for (long m = 0; m < M; ++m) {
        rows[m] = QuantRow{q.data() + m * K, d.data() + m * (K / 32), sums.data() + m * (K / 32)};
        quantize_row(x + m * K, K, rows[m]);
    }
    const long groups = (N + 15) / 16, group_bytes = 16 * K * BITS / 8, group_scales = 16 * (K / 32);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long g = 0; g < groups; ++g) {
        for (long m = 0; m < M; ++m) {
            float out[16];
            _mm512_storeu_ps(out, group_dot<BITS>(w + g * group_bytes, s + g * group_scales, rows[m], K));
            for (long r = 0; r < 16 && g * 16 + r < N; ++r) store(y + m * N + g * 16 + r, out[r]);
        }
    }
}

}  // namespace

#define LLAMACTL_MATVEC(BITS, SUFFIX, TIN, TOUT)                                                              \
    extern "C" void matvec_q##BITS##_##SUFFIX(const void* w, const void* s, const void* x, void* y, long M, long N, \
                                              long K, int threads) {                                         \
        matvec<BITS, TIN, TOUT>((const uint8_t*)w, (const uint16_t*)s, (const TIN*)x, (TOUT*)y, M, N, K, threads); \
    }
#define LLAMACTL_MATVEC_WIDTHS(BITS)                 \
    LLAMACTL_MATVEC(BITS, f32_f32, float, float)     \
    LLAMACTL_MATVEC(BITS, bf16_bf16, bf16, bf16)     \
    LLAMACTL_MATVEC(BITS, bf16_f32, bf16, float)     \
    LLAMACTL_MATVEC(BITS, f16_f16, f16, f16)         \
    LLAMACTL_MATVEC(BITS, f16_f32, f16, float)

LLAMACTL_MATVEC_WIDTHS(4)
LLAMACTL_MATVEC_WIDTHS(8)

namespace {
// 16 floats into dtype T (round to nearest even), stored.
inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(f16* y, __m512 v) {
    _mm256_storeu_si256((__m256i*)y, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(bf16* y, __m512 v) {  // as `store(bf16*, float)`, 16 at a time
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i*)y, _mm512_cvtepi32_epi16(r));
}

// A block scale as torch's `q * d.to(T)` uses it: fp16 -> T (bf16 rounds it), then fp32.
inline float scale_as(float d, float*) { return d; }
inline float scale_as(float d, f16*) { return d; }
inline float scale_as(float d, bf16*) {
    bf16 b;
    store(&b, d);
    uint32_t u = (uint32_t)b.bits << 16;
    memcpy(&d, &u, 4);
    return d;
}

// W [groups * 16, K] in T, row-major, from repack's layout: the rows a prefill's dense matmul
// reads. Exactly matvec.py's torch fallback, round(q * d) (q: Q8_0's int8, Q4_0's u - 8); ~8x
// faster than its unpack / permute / multiply passes over memory.
template <int BITS, typename T> void dequantize(const uint8_t* w, const uint16_t* s, T* out, long groups, long K, int threads) {
    const long blocks = K / 32, group_bytes = 16 * K * BITS / 8, group_scales = 16 * blocks;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long g = 0; g < groups; ++g) {
        for (long b = 0; b < blocks; ++b) {
            // lanes[j][r]: values 4j..4j+3 of row r in this block (4 bytes), as the kernels read them
            uint32_t lanes[8][16];
            if (BITS == 8) {
                memcpy(lanes, w + g * group_bytes + b * 8 * 64, sizeof lanes);
            } else {
                const uint8_t* wb = w + g * group_bytes + b * 4 * 64;
                const __m512i low4 = _mm512_set1_epi8(0x0F);
                for (int st = 0; st < 4; ++st) {
                    const __m512i v = _mm512_loadu_si512(wb + st * 64);
                    _mm512_storeu_si512(lanes[2 * st], _mm512_and_si512(v, low4));
                    _mm512_storeu_si512(lanes[2 * st + 1], _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
                }
            }
            float d[16];
            _mm512_storeu_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + g * group_scales + b * 16))));
            for (int r = 0; r < 16; ++r) {
                uint32_t row[8];  // the row's 32 values of this block, in order
                for (int j = 0; j < 8; ++j) row[j] = lanes[j][r];
                const __m128i lo8 = _mm_loadu_si128((const __m128i*)row), hi8 = _mm_loadu_si128((const __m128i*)row + 1);
                __m512i lo = BITS == 8 ? _mm512_cvtepi8_epi32(lo8) : _mm512_cvtepu8_epi32(lo8);
                __m512i hi = BITS == 8 ? _mm512_cvtepi8_epi32(hi8) : _mm512_cvtepu8_epi32(hi8);
                if (BITS == 4) {
                    lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
                    hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
                }
                const __m512 scale = _mm512_set1_ps(scale_as(d[r], out));
                T* y = out + (g * 16 + r) * K + b * 32;
                store16(y, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), scale));
                store16(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), scale));
            }
        }
    }
}
}  // namespace

#define LLAMACTL_DEQUANTIZE(BITS, SUFFIX, T)                                                                 \
    extern "C" void dequantize_q##BITS##_##SUFFIX(const void* w, const void* s, void* out, long groups, long K, \
                                                  int threads) {                                            \
        dequantize<BITS, T>((const uint8_t*)w, (const uint16_t*)s, (T*)out, groups, K, threads);             \
    }
LLAMACTL_DEQUANTIZE(4, f32, float)
LLAMACTL_DEQUANTIZE(4, bf16, bf16)
LLAMACTL_DEQUANTIZE(4, f16, f16)
LLAMACTL_DEQUANTIZE(8, f32, float)
LLAMACTL_DEQUANTIZE(8, bf16, bf16)
LLAMACTL_DEQUANTIZE(8, f16, f16)

namespace {
// fp32 weights as stored ([N, K], row-major) times fp32 activations, one row after another (one
// sequential stream of weights per thread, as the bf16 matvec below), two accumulators over
// alternate 16-value blocks, the last block masked.
inline float f32_row(const float* w, const float* x, long K) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    long k = 0;
    for (; k + 32 <= K; k += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), acc1);
    }
    for (; k < K; k += 16) {
        const __mmask16 live = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, w + k), _mm512_maskz_loadu_ps(live, x + k), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
}  // namespace

extern "C" void matvec_f32_f32(const void* w, const void* x, void* y, long M, long N, long K, int threads) {
    const float *wf = (const float*)w, *xf = (const float*)x;
    float* yf = (float*)y;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < N; ++r)
        for (long m = 0; m < M; ++m) yf[m * N + r] = f32_row(wf + r * K, xf + m * K, K);
}

#if defined(__AVX512BF16__)
namespace {

// bf16 weights as stored ([N, K], row-major), times bf16 activations: vdpbf16ps multiplies 32
// bf16 pairs exactly into 16 fp32 sums (what torch's bf16 matmul accumulates in), two
// accumulators over alternate 32-value blocks so that consecutive vdpbf16ps do not wait on each
// other; the 2 x 16 partial sums add up in a tree at the end. K need not be a multiple of 32:
// the last load is masked (zeros past the end).
inline float bf16_row(const uint16_t* w, const uint16_t* x, long K) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        acc1 = _mm512_dpbf16_ps(
            acc1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < K; k += 32) {
        const __mmask32 live = K - k >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (K - k)) - 1);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(live, w + k),
                                (__m512bh)_mm512_maskz_loadu_epi16(live, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// Rows one after another, each thread a contiguous range of them: one sequential stream of
// weights per thread. (Four rows sharing each load of x read 4 streams at once and left the
// hardware prefetcher behind on an AMD EPYC: the 32000x768 head from DRAM at 21 GB/s, against
// 49 one row at a time; 110M decode 1.49x, 2 threads.)
template <typename Tout>
void matvec_bf16(const uint16_t* w, const uint16_t* x, Tout* y, long M, long N, long K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < N; ++r)
        for (long m = 0; m < M; ++m) store(y + m * N + r, bf16_row(w + r * K, x + m * K, K));
}

}  // namespace

extern "C" void matvec_bf16_bf16(const void* w, const void* x, void* y, long M, long N, long K, int threads) {
    matvec_bf16((const uint16_t*)w, (const uint16_t*)x, (bf16*)y, M, N, K, threads);
}
extern "C" void matvec_bf16_f32(const void* w, const void* x, void* y, long M, long N, long K, int threads) {
    matvec_bf16((const uint16_t*)w, (const uint16_t*)x, (float*)y, M, N, K, threads);
}
#endif

#endif
