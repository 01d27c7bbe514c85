// Fused kernels for inference and training steps on CUDA (see fused/mod.rs).
//
// Each kernel replaces a run of candle's kernels in a decoder step and
// rounds where they round (every intermediate that candle writes to memory
// in the compute dtype is rounded to it here too), so that a fused step
// computes what an eager step computes up to the order of f32 sums.
//
// Every kernel exists for bf16, f16 and f32 (`<name>_bf16` ...).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// The tanh candle's unary kernels use, in the element type.
__device__ __forceinline__ float tanh_t(float a) { return tanhf(a); }
__device__ __forceinline__ __nv_bfloat16 tanh_t(__nv_bfloat16 a) { return __float2bfloat16(tanhf(__bfloat162float(a))); }
__device__ __forceinline__ __half tanh_t(__half a) { return __float2half(tanhf(__half2float(a))); }

__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_f2(__half2 v) { return __half22float2(v); }

// Eight consecutive 16-bit elements, read as pairs of type T2, as floats
// (16-byte aligned).
template <typename T2>
__device__ __forceinline__ void load8_pairs(const void *p, float *out) {
    uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const T2 *h = reinterpret_cast<const T2 *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = to_f2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Eight consecutive elements as floats (16-byte aligned for 16-bit types,
// 32-byte for f32).
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float *out) {
    load8_pairs<__nv_bfloat162>(p, out);
}
__device__ __forceinline__ void load8(const __half *p, float *out) {
    load8_pairs<__half2>(p, out);
}
__device__ __forceinline__ void load8(const float *p, float *out) {
    float4 a = *reinterpret_cast<const float4 *>(p);
    float4 b = *reinterpret_cast<const float4 *>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

// The reductions the kernels use: a combining function and its identity.
struct Sum {
    static __device__ __forceinline__ float apply(float a, float b) { return a + b; }
    static constexpr float identity = 0.0f;
};
struct Max {
    static __device__ __forceinline__ float apply(float a, float b) { return fmaxf(a, b); }
    static constexpr float identity = -INFINITY;
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<Sum>(v); }

// Reduction over the block (blockDim.x a multiple of 32), returned to
// every thread. `scratch` holds 32 floats; every thread must call it.
template <typename Op>
__device__ float block_reduce(float v, float *scratch) {
    v = warp_reduce<Op>(v);
    if (blockDim.x <= WARP) return v;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / WARP ? scratch[lane] : Op::identity;
    return warp_reduce<Op>(v);
}

__device__ float block_sum(float v, float *scratch) { return block_reduce<Sum>(v, scratch); }
__device__ float block_max(float v, float *scratch) { return block_reduce<Max>(v, scratch); }

// Every index `i` below `n`, spread over the whole grid (a grid-stride
// loop: any grid size covers every index).
#define FOR_EACH_INDEX(i, n)                                                                     \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                      \
         i += (size_t)gridDim.x * blockDim.x)

// The arg-max merge rule: the larger value wins, then the smaller index.
__device__ __forceinline__ void argmax_merge(float &best, int &arg, const float v, const int a) {
    if (v > best || (v == best && a < arg)) {
        best = v;
        arg = a;
    }
}

// The arg-max over a warp's lanes, returned to every lane.
__device__ __forceinline__ void warp_argmax(float &best, int &arg) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        argmax_merge(best, arg, __shfl_xor_sync(0xffffffff, best, o),
                     __shfl_xor_sync(0xffffffff, arg, o));
    }
}

// (mean(x²) + eps)^-½ over a row of n elements, returned to every thread
// of the block (every thread must call it).
template <typename T>
__device__ float rms_scale(const T *x, const int n, const float eps, float *scratch) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = to_f(x[i]);
        acc += v * v;
    }
    acc = block_sum(acc, scratch);
    return rsqrtf(acc / n + eps);
}

// h = residual + norm_post(x) (or residual + x without `a_post`), then
// y = norm_next(h); one block per row of `n` features. Both outputs are
// written: h is the next residual, y the next block's input.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *residual, const T *a_post, const T *a_next,
                             T *h_out, T *y_out, const int n, const float eps_post,
                             const float eps_next) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    x += row * n;
    residual += row * n;
    h_out += row * n;
    y_out += row * n;
    const float scale = a_post != nullptr ? rms_scale(x, n, eps_post, scratch) : 1.0f;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const T xn = a_post != nullptr ? from_f<T>(scale * to_f(x[i]) * to_f(a_post[i])) : x[i];
        const T h = from_f<T>(to_f(residual[i]) + to_f(xn));
        h_out[i] = h;
        const float hv = to_f(h);
        acc += hv * hv;
    }
    acc = block_sum(acc, scratch);
    const float scale_next = rsqrtf(acc / n + eps_next);
    // Each thread reads back only the elements it wrote.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        y_out[i] = from_f<T>(scale_next * to_f(h_out[i]) * to_f(a_next[i]));
    }
}

// Training: the gradient of y = rms_norm(x) · alpha (candle's kernel, f32
// inside) for the incoming gradient g, one block per row of n features:
// dx = r·(g·a) - x·r³·mean(g·a·x) with r = (mean(x²) + eps)^-½, in f32 and
// rounded to T once.
template <typename T>
__device__ void rms_norm_grad(const T *x, const T *g, const T *alpha, T *dx, const int n,
                              const float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    x += row * n;
    g += row * n;
    dx += row * n;
    float sq = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float xv = to_f(x[i]);
        sq += xv * xv;
        dot += to_f(g[i]) * to_f(alpha[i]) * xv;
    }
    sq = block_sum(sq, scratch);
    dot = block_sum(dot, scratch);
    const float r = rsqrtf(sq / n + eps);
    const float c = r * r * r * dot / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        dx[i] = from_f<T>(r * to_f(g[i]) * to_f(alpha[i]) - to_f(x[i]) * c);
    }
}

// Queries, keys and values of one step after their projections: the query
// and key norms (when given), rotary embedding of queries and keys (angles
// `positions[bt] * inv_freq[i]` in f32, their cos and sin rounded to T as
// candle's tables are), the
// queries written to `q_out` in the projection's layout `[B*T, nh, D]`, the
// keys and values written into the cache `[B, nkv, C, D]` at the columns
// `cols[t]` (at column t when `cols` is null). Grid (B*T, nh + 2*nkv);
// each block holds one head's vector, thread i its elements i and i + D/2.
template <typename T>
__device__ void qk_rope_store(const T *q, const T *k, const T *v, const T *q_alpha,
                              const T *k_alpha, const float eps, const uint32_t *positions,
                              const float *inv_freq, const uint32_t *cols, T *k_cache,
                              T *v_cache, T *q_out,
                              const int t_len, const int nh, const int nkv, const int d,
                              const int cap) {
    __shared__ float scratch[32];
    const int bt = blockIdx.x, slot = blockIdx.y;
    const int b = bt / t_len, t = bt % t_len;
    const int half = d / 2, i = threadIdx.x;
    const bool active = i < half;
    const size_t col = cols != nullptr ? cols[t] : t;
    const T *src;
    const T *alpha;
    T *dst;
    bool rotate = true;
    if (slot < nh) {
        src = q + ((size_t)bt * nh + slot) * d;
        alpha = q_alpha;
        dst = q_out + ((size_t)bt * nh + slot) * d;
    } else if (slot < nh + nkv) {
        const int j = slot - nh;
        src = k + ((size_t)bt * nkv + j) * d;
        alpha = k_alpha;
        dst = k_cache + (((size_t)b * nkv + j) * cap + col) * d;
    } else {
        const int j = slot - nh - nkv;
        src = v + ((size_t)bt * nkv + j) * d;
        alpha = nullptr;
        dst = v_cache + (((size_t)b * nkv + j) * cap + col) * d;
        rotate = false;
    }
    T x1 = active ? src[i] : from_f<T>(0.0f);
    T x2 = active ? src[i + half] : from_f<T>(0.0f);
    if (alpha != nullptr) {
        const float f1 = to_f(x1), f2 = to_f(x2);
        const float acc = block_sum(f1 * f1 + f2 * f2, scratch);
        const float scale = rsqrtf(acc / d + eps);
        if (active) {
            x1 = from_f<T>(scale * f1 * to_f(alpha[i]));
            x2 = from_f<T>(scale * f2 * to_f(alpha[i + half]));
        }
    }
    if (!active) return;
    if (rotate) {
        const float angle = (float)positions[bt] * inv_freq[i];
        const T c = from_f<T>(cosf(angle));
        const T s = from_f<T>(sinf(angle));
        const T y1 = x1 * c - x2 * s;
        const T y2 = x1 * s + x2 * c;
        x1 = y1;
        x2 = y2;
    }
    dst[i] = x1;
    dst[i + half] = x2;
}

// Keys a warp scores per round (their loads in flight together).
#define KEYS_PER_ROUND 4

// Attention of one query row over the keys of its kv head:
// softmax(softcap(q·kᵀ · scale) + mask) · v, rounded where candle's eager
// path rounds (scores in the compute dtype, softmax in f32, probabilities
// in the compute dtype, f32 sums of the products). `q` and `out` are
// `[B*T, nh, D]`, keys and values `[B, nkv, S, D]`, the mask `[B, 1, T, S]`
// additive (-inf hides a column). One block per (b, t, head): each warp
// scores KEYS_PER_ROUND keys per round (a lane reads 8 features of each at
// a time) and sums its share of the values; the block adds the warps'
// partial outputs. Needs D % 8 == 0; shared memory (D + S + warps·D)
// floats.
template <typename T>
__device__ void attention(const T *q, const T *k, const T *v, const T *mask, T *out,
                          const int t_len, const int nh, const int nkv, const int s_len,
                          const int d, const float scale, const float softcap) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    __shared__ int range[2];
    const int warps = blockDim.x / WARP;
    float *qs = smem;
    float *p = qs + d;
    float *partial = p + s_len;
    const int row = blockIdx.x;  // (b * T + t) * nh + h
    const int h = row % nh, bt = row / nh;
    const int b = bt / t_len, t = bt % t_len;
    const int j = h / (nh / nkv);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const T *qrow = q + (size_t)row * d;
    const T *keys = k + ((size_t)b * nkv + j) * s_len * d;
    const T *values = v + ((size_t)b * nkv + j) * s_len * d;
    const T *m = mask + ((size_t)b * t_len + t) * s_len;
    for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = to_f(qrow[i]);
    if (threadIdx.x == 0) {
        range[0] = s_len;
        range[1] = -1;
    }
    __syncthreads();

    // Scores: KEYS_PER_ROUND keys per warp and round.
    const T scale_t = from_f<T>(scale);
    int lo = s_len, hi = -1;
    for (int c0 = warp * KEYS_PER_ROUND; c0 < s_len; c0 += warps * KEYS_PER_ROUND) {
        float mv[KEYS_PER_ROUND], acc[KEYS_PER_ROUND];
#pragma unroll
        for (int u = 0; u < KEYS_PER_ROUND; ++u) {
            const int c = c0 + u;
            mv[u] = c < s_len ? to_f(m[c]) : -INFINITY;
            acc[u] = 0.0f;
        }
        for (int f = lane * 8; f < d; f += WARP * 8) {
            float kv8[KEYS_PER_ROUND][8];
#pragma unroll
            for (int u = 0; u < KEYS_PER_ROUND; ++u) {
                if (mv[u] != -INFINITY) load8(keys + (size_t)(c0 + u) * d + f, kv8[u]);
            }
#pragma unroll
            for (int u = 0; u < KEYS_PER_ROUND; ++u) {
                if (mv[u] != -INFINITY) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[u] += qs[f + e] * kv8[u][e];
                }
            }
        }
#pragma unroll
        for (int u = 0; u < KEYS_PER_ROUND; ++u) {
            const int c = c0 + u;
            if (c >= s_len) break;
            float score = -INFINITY;
            if (mv[u] != -INFINITY) {
                T s = from_f<T>(warp_sum(acc[u]));
                // candle's affine multiplies by the scale in the element type.
                if (scale > 0.0f) s = from_f<T>(to_f(s) * to_f(scale_t));
                if (softcap > 0.0f) s = from_f<T>(softcap * tanhf(to_f(s) * (1.0f / softcap)));
                score = to_f(from_f<T>(to_f(s) + mv[u]));
                lo = min(lo, c);
                hi = max(hi, c);
            }
            if (lane == 0) p[c] = score;
        }
    }
    if (lane == 0) {
        atomicMin(&range[0], lo);
        atomicMax(&range[1], hi);
    }
    __syncthreads();
    const int first = range[0], last = range[1];

    // Softmax in f32 over the unmasked range.
    float mx = -INFINITY;
    for (int c = first + threadIdx.x; c <= last; c += blockDim.x) mx = fmaxf(mx, p[c]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int c = first + threadIdx.x; c <= last; c += blockDim.x) {
        const float e = p[c] == -INFINITY ? 0.0f : expf(p[c] - mx);
        p[c] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int c = first + threadIdx.x; c <= last; c += blockDim.x) {
        p[c] = sum > 0.0f ? to_f(from_f<T>(p[c] / sum)) : 0.0f;
    }
    __syncthreads();

    // Weighted values: each warp its keys, a lane 8 features at a time,
    // KEYS_PER_ROUND keys' loads in flight together.
    for (int f0 = 0; f0 < d; f0 += WARP * 8) {
        const int f = f0 + lane * 8;
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (f < d) {
            for (int c0 = first + warp * KEYS_PER_ROUND; c0 <= last; c0 += warps * KEYS_PER_ROUND) {
                float v8[KEYS_PER_ROUND][8];
                float pc[KEYS_PER_ROUND];
#pragma unroll
                for (int u = 0; u < KEYS_PER_ROUND; ++u) {
                    const int c = c0 + u;
                    pc[u] = c <= last ? p[c] : 0.0f;
                    if (pc[u] != 0.0f) load8(values + (size_t)c * d + f, v8[u]);
                }
#pragma unroll
                for (int u = 0; u < KEYS_PER_ROUND; ++u) {
                    if (pc[u] != 0.0f) {
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[e] += pc[u] * v8[u][e];
                    }
                }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) partial[warp * d + f + e] = acc[e];
        }
    }
    __syncthreads();
    T *o = out + (size_t)row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < warps; ++w) acc += partial[w * d + i];
        o[i] = from_f<T>(acc);
    }
}

// The attention probabilities of a wide step from its scores (candle's
// batched matmul computed them): softmax(softcap(scores · scale) + mask),
// rounded where candle's eager path rounds. `scores` and `out` are
// `[B, M, S]`; row `r` of batch `b` takes the mask row of query column
// `t = (r / div) % T` from `mask: [B, 1, T, S]` (div = nh for rows laid out
// as (t, head), 1 for rows laid out as (kv head, group head, t)). One block
// per row; shared memory S floats. Training also takes the probabilities in
// f32 (`out32`, for the backward) and `tanh(s / cap)` (`th`, f32) with a cap;
// inference passes null for both. A row the mask hides entirely gets zeros.
template <typename T>
__device__ void masked_softmax(const T *scores, const T *mask, T *out, float *out32, float *th,
                               const int m_rows, const int t_len, const int div,
                               const int s_len, const float scale, const float softcap) {
    extern __shared__ float p[];
    __shared__ float scratch[32];
    const int row = blockIdx.x;  // b * M + r
    const int b = row / m_rows, r = row % m_rows;
    const int t = (r / div) % t_len;
    const size_t base = (size_t)row * s_len;
    const T *m = mask + ((size_t)b * t_len + t) * s_len;
    const T scale_t = from_f<T>(scale);
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < s_len; c += blockDim.x) {
        T v = scores[base + c];
        if (scale > 0.0f) v = from_f<T>(to_f(v) * to_f(scale_t));
        if (softcap > 0.0f) {
            const float h = tanhf(to_f(v) * (1.0f / softcap));
            if (th != nullptr) th[base + c] = h;
            v = from_f<T>(h * softcap);
        }
        const float mv = to_f(m[c]);
        const float score = mv == -INFINITY ? -INFINITY : to_f(from_f<T>(to_f(v) + mv));
        p[c] = score;
        mx = fmaxf(mx, score);
    }
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < s_len; c += blockDim.x) {
        const float e = p[c] == -INFINITY ? 0.0f : expf(p[c] - mx);
        p[c] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int c = threadIdx.x; c < s_len; c += blockDim.x) {
        const float q = sum > 0.0f ? p[c] / sum : 0.0f;
        out[base + c] = from_f<T>(q);
        if (out32 != nullptr) out32[base + c] = q;
    }
}

// `rows` copies of a `len`-element block (16 bytes per element here: the
// caller views any dtype as 16-byte words) one after the other: a shared
// prompt prefix's keys and values repeated for every message of a batch.
extern "C" __global__ void repeat_rows(const uint4 *src, uint4 *dst, const size_t len,
                                       const size_t total) {
    FOR_EACH_INDEX(i, total) {
        dst[i] = src[i % len];
    }
}

// Training: an inverted-dropout mask, keep[i] = 0 with probability p and
// `scale` = 1 / (1 - p) otherwise, drawn from a counter-based hash of
// (stream, i) (SplitMix64's finaliser; `linear::dropout_draw` is the same
// function on the host, so every device drops the same elements). The
// stream is `salt`, xor-ed with `*seed` when `seed` is not null: a captured
// training step reads its step's seed from device memory.
extern "C" __global__ void dropout_mask(float *keep, const size_t n,
                                        const unsigned long long *seed,
                                        const unsigned long long salt, const float p,
                                        const float scale) {
    const unsigned long long stream = seed ? (*seed ^ salt) : salt;
    FOR_EACH_INDEX(i, n) {
        unsigned long long z = stream + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        keep[i] = u < p ? 0.0f : scale;
    }
}

// Training: `base + (delta · scale · mul)` where base and out are in the
// compute dtype and delta (and mul, when given) in f32, rounded as candle's
// composed ops round: the f32 product, then the compute dtype, then the sum
// in the compute dtype. The LoRA branch's term added to the frozen
// projection (forward: scale = the adapter's scaling; backward: mul = the
// dropout mask).
template <typename T>
__device__ void add_rounded(const T *base, const float *delta, const float *mul, T *out,
                            const size_t n, const float scale) {
    FOR_EACH_INDEX(i, n) {
        float v = delta[i] * scale;
        if (mul) v *= mul[i];
        out[i] = from_f<T>(to_f(base[i]) + to_f(from_f<T>(v)));
    }
}

// Training: out = f32(x) · scale (· mul, when given), in f32: a LoRA
// branch's input cast with its dropout mask applied (forward), or the
// incoming gradient cast with the adapter's scaling (backward).
template <typename T>
__device__ void cast_scaled(const T *x, const float *mul, float *out, const size_t n,
                            const float scale) {
    FOR_EACH_INDEX(i, n) {
        float v = to_f(x[i]) * scale;
        if (mul) v *= mul[i];
        out[i] = v;
    }
}

// Training: y = rms_norm(x) · alpha over rows of n features, as candle's
// rmsnorm kernel computes it ((r · x) · alpha in f32, rounded to T once),
// one block per row with a thread per pair of features (candle's kernel
// gives a row one warp).
template <typename T>
__device__ void rms_norm_rows(const T *x, const T *alpha, T *y, const int n, const float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    x += row * n;
    y += row * n;
    const float r = rms_scale(x, n, eps, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        y[i] = from_f<T>(r * to_f(x[i]) * to_f(alpha[i]));
    }
}

// Eight consecutive elements written from floats (aligned as for load8).
__device__ __forceinline__ void store8(__nv_bfloat16 *p, const float *v) {
    uint4 raw;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = raw;
}
__device__ __forceinline__ void store8(__half *p, const float *v) {
    uint4 raw;
    __half2 *h = reinterpret_cast<__half2 *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = raw;
}
__device__ __forceinline__ void store8(float *p, const float *v) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4 *>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// Training: out = a + b in T (the sum rounded once, as candle's add), eight
// elements per thread (every pointer 16-byte aligned, n a multiple of 8):
// a residual add, or two gradients meeting at a tensor two nodes read.
template <typename T>
__device__ void add8(const T *a, const T *b, T *out, const size_t n8) {
    FOR_EACH_INDEX(i, n8) {
        float x[8], y[8];
        load8(a + 8 * i, x);
        load8(b + 8 * i, y);
#pragma unroll
        for (int j = 0; j < 8; ++j) x[j] += y[j];
        store8(out + 8 * i, x);
    }
}

// Training's backward of masked_softmax (its `out32` and `th`), from
// dp = g · vᵀ (T, `[rows, S]`): per row
// ds = (dp - Σ dp·p)·p in f32, times (1 - th²) through a soft cap, rounded
// to T, then times the scale in T (as the composed ops round). One block
// per row.
template <typename T>
__device__ void softmax_probs_grad(const T *dp, const float *p32, const float *th, T *ds,
                                   const int s_len, const float scale) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * s_len;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < s_len; c += blockDim.x) {
        dot += to_f(dp[base + c]) * p32[base + c];
    }
    dot = block_sum(dot, scratch);
    const T scale_t = from_f<T>(scale);
    for (int c = threadIdx.x; c < s_len; c += blockDim.x) {
        float d = (to_f(dp[base + c]) - dot) * p32[base + c];
        if (th != nullptr) {
            const float h = th[base + c];
            d *= -(h * h) + 1.0f;
        }
        T out = from_f<T>(d);
        if (scale > 0.0f) out = from_f<T>(to_f(out) * to_f(scale_t));
        ds[base + c] = out;
    }
}

// Training: `[A, X, Y, D]` -> `[A, Y, X, D]` (axes 1 and 2 swapped: the
// heads' transposes around attention), each row of D elements moved as
// `d_words` 16-byte words.
extern "C" __global__ void swap_axes12(const uint4 *src, uint4 *dst, const int x_len,
                                       const int y_len, const int d_words, const size_t total) {
    FOR_EACH_INDEX(i, total) {
        const size_t w = i % d_words, r = i / d_words;  // r = (a * Y + y) * X + x
        const size_t x = r % x_len, ay = r / x_len;
        const size_t y = ay % y_len, a = ay / y_len;
        dst[i] = src[((a * x_len + x) * y_len + y) * d_words + w];
    }
}

// Training's optimizer: AdamW over many f32 tensors at once. Tensor k's
// parameters, gradient and moments start at params[k], grads[k], ms[k] and
// vs[k] (device addresses) and hold lens[k] elements; block (c, k) of a
// grid (chunks, tensors) takes elements [c·ADAM_CHUNK, (c+1)·ADAM_CHUNK) of
// tensor k.
#define ADAM_CHUNK 2048

// Stage one of the gradients' global norm: each block's Σ g², written to
// partial[k · chunks + c] (0 past a tensor's end).
extern "C" __global__ void adamw_sq_partial(const unsigned long long *grads,
                                            const unsigned int *lens, float *partial) {
    __shared__ float scratch[32];
    const int k = blockIdx.y;
    const float *g = reinterpret_cast<const float *>(grads[k]);
    const size_t end = min((size_t)lens[k], (size_t)(blockIdx.x + 1) * ADAM_CHUNK);
    float acc = 0.0f;
    for (size_t i = (size_t)blockIdx.x * ADAM_CHUNK + threadIdx.x; i < end; i += blockDim.x) {
        acc += g[i] * g[i];
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[(size_t)k * gridDim.x + blockIdx.x] = acc;
}

// Stage two, one block: the norm (written to norm[0], the host reads it)
// and the moments' coefficients with clipping folded in,
// coef = [(1 - β1)·clip, (1 - β2)·clip²], clip = max_norm / (norm + 1e-6)
// above max_norm (hyper[3]), else 1. In a fixed order: the same gradients
// give the same norm.
extern "C" __global__ void adamw_clip(const float *partial, const int n, const float *hyper,
                                      float *norm, float *coef, const float one_minus_beta1,
                                      const float one_minus_beta2) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        const float total = sqrtf(acc), max_norm = hyper[3];
        const float clip = total > max_norm ? max_norm / (total + 1e-6f) : 1.0f;
        norm[0] = total;
        coef[0] = clip * one_minus_beta1;
        coef[1] = (clip * clip) * one_minus_beta2;
    }
}

// Stage three: the update, as the composed ops compute it (no fused
// multiply-adds): m = β1·m + g·coef[0], v = β2·v + g²·coef[1],
// p = p·decay - (m·lr_bc1) / (√(v·inv_bc2) + ε), with
// hyper = [lr_bc1, decay, inv_bc2, max_norm].
extern "C" __global__ void adamw_apply(const unsigned long long *params,
                                       const unsigned long long *grads,
                                       const unsigned long long *ms,
                                       const unsigned long long *vs, const unsigned int *lens,
                                       const float *hyper, const float *coef, const float beta1,
                                       const float beta2, const float eps) {
    const int k = blockIdx.y;
    float *p = reinterpret_cast<float *>(params[k]);
    const float *g = reinterpret_cast<const float *>(grads[k]);
    float *m = reinterpret_cast<float *>(ms[k]);
    float *v = reinterpret_cast<float *>(vs[k]);
    const float lr_bc1 = hyper[0], decay = hyper[1], inv_bc2 = hyper[2];
    const float c1 = coef[0], c2 = coef[1];
    const size_t end = min((size_t)lens[k], (size_t)(blockIdx.x + 1) * ADAM_CHUNK);
    for (size_t i = (size_t)blockIdx.x * ADAM_CHUNK + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, c1));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), c2));
        m[i] = mi;
        v[i] = vi;
        const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, inv_bc2)), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(mi, lr_bc1), denom));
    }
}

// Row statistics of f32 logits `[rows, n]`, in two stages over many blocks
// (a single block per row reads 262k columns slowly). Stage one: block
// (chunk, row) reduces its columns to (max, first index of the max,
// Σ exp(x - max)).
extern "C" __global__ void row_stats_partial(const float *x, const int n, const int chunk, float *p_max,
                                  int *p_arg, float *p_sum) {
    __shared__ float s_max[32];
    __shared__ int s_arg[32];
    __shared__ float scratch[32];
    const int row = blockIdx.y, part = blockIdx.x, parts = gridDim.x;
    const int begin = part * chunk, end = min(n, begin + chunk);
    const float *r = x + (size_t)row * n;
    float best = -INFINITY;
    int arg = begin;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float v = r[i];
        if (v > best) {
            best = v;
            arg = i;
        }
    }
    // Arg-max over the block: larger value wins, then the smaller index.
    warp_argmax(best, arg);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    if (lane == 0) {
        s_max[warp] = best;
        s_arg[warp] = arg;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? s_max[lane] : -INFINITY;
        arg = lane < warps ? s_arg[lane] : begin;
        warp_argmax(best, arg);
        if (lane == 0) {
            s_max[0] = best;
            s_arg[0] = arg;
        }
    }
    __syncthreads();
    const float mx = s_max[0];
    float sum = 0.0f;
    if (mx != -INFINITY) {
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x) sum += expf(r[i] - mx);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        p_max[row * parts + part] = mx;
        p_arg[row * parts + part] = s_arg[0];
        p_sum[row * parts + part] = sum;
    }
}

// Stage two, one warp per row: the row's arg-max and the probability of
// column `token` (softmax over the whole row), merged from the parts.
extern "C" __global__ void row_stats_final(const float *x, const int n, const int parts, const float *p_max,
                                const int *p_arg, const float *p_sum, const int token,
                                uint32_t *argmax, float *prob) {
    const int row = blockIdx.x, lane = threadIdx.x;
    float best = -INFINITY;
    int arg = 0;
    for (int i = lane; i < parts; i += WARP) {
        argmax_merge(best, arg, p_max[row * parts + i], p_arg[row * parts + i]);
    }
    warp_argmax(best, arg);
    float sum = 0.0f;
    for (int i = lane; i < parts; i += WARP) {
        const float m = p_max[row * parts + i];
        if (m != -INFINITY) sum += p_sum[row * parts + i] * expf(m - best);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
        argmax[row] = (uint32_t)arg;
        if (prob != nullptr) {
            const float v = x[(size_t)row * n + token];
            prob[row] = sum > 0.0f ? expf(v - best) / sum : 0.0f;
        }
    }
}

// Training's loss over the output head's logits `[rows, vocab]` (in the
// compute dtype): per row the log-sum-exp and the weighted negative
// log-likelihood of the row's target, w · (lse - logit[target]), all in
// f32. One block per row, one pass: each thread keeps a running (max,
// Σ exp(x - max)), merged over the block.
template <typename T>
__device__ void nll_rows(const T *logits, const uint32_t *targets, const float *weights,
                         float *lse_out, float *loss_out, const int vocab) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const T *x = logits + (size_t)row * vocab;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = to_f(x[j]);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    const float mx = block_max(m, scratch);
    s = m == -INFINITY ? 0.0f : s * expf(m - mx);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const float lse = mx + logf(s);
        lse_out[row] = lse;
        loss_out[row] = weights[row] * (lse - to_f(x[targets[row]]));
    }
}

// Its gradient: d/dlogit[row, j] = g · w[row] · (softmax_j - [j == target]),
// written in T (what the head's backward matmul reads). `g` is the loss's
// incoming gradient, read from the device.
template <typename T>
__device__ void nll_grad(const T *logits, const uint32_t *targets, const float *weights,
                         const float *lse, const float *g, T *out, const int vocab) {
    const int row = blockIdx.y;
    const size_t base = (size_t)row * vocab;
    const float scale = *g * weights[row], l = lse[row];
    const int target = (int)targets[row];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < vocab; j += gridDim.x * blockDim.x) {
        float p = expf(to_f(logits[base + j]) - l);
        if (j == target) p -= 1.0f;
        out[base + j] = from_f<T>(scale * p);
    }
}

// The MLP's activation in the element type, as candle's unary kernels
// compute it: act 0 is tanh-approximated GELU (in T arithmetic), 1 is SiLU
// (in f32).
template <typename T>
__device__ __forceinline__ T activate(const T x, const int act) {
    if (act == 0) {
        const T x_sq = x * x;
        const T x_cube = x_sq * x;
        const T alpha = x + from_f<T>(0.044715f) * x_cube;
        return from_f<T>(0.5f) * x *
               (from_f<T>(1.0f) + tanh_t(from_f<T>((float)(M_2_SQRTPI * M_SQRT1_2)) * alpha));
    }
    const float xf = to_f(x);
    return from_f<T>(xf / (1.0f + expf(-xf)));
}

// act(gate) * up elementwise (the activation's result rounded, then the
// product, as candle's two kernels do).
template <typename T>
__device__ void gated(const T *gate, const T *up, T *out, const size_t n, const int act) {
    FOR_EACH_INDEX(i, n) {
        out[i] = activate(gate[i], act) * up[i];
    }
}

// The gradients of gated(): with g the product's incoming gradient,
// d_gate = g · up · act'(gate) and d_up = g · act(gate), in f32, rounded to
// T once (act' of tanh-approximated GELU and of SiLU written out).
template <typename T>
__device__ void gated_grad(const T *gate, const T *up, const T *g, T *d_gate, T *d_up,
                           const size_t n, const int act) {
    FOR_EACH_INDEX(i, n) {
        const float x = to_f(gate[i]), u = to_f(up[i]), gi = to_f(g[i]);
        float slope;
        if (act == 0) {
            const float k = (float)(M_2_SQRTPI * M_SQRT1_2);
            const float t = tanhf(k * (x + 0.044715f * x * x * x));
            slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
        } else {
            const float sig = 1.0f / (1.0f + expf(-x));
            slope = sig * (1.0f + x * (1.0f - sig));
        }
        d_gate[i] = from_f<T>(gi * u * slope);
        d_up[i] = from_f<T>(gi * to_f(activate(gate[i], act)));
    }
}

// Rows a skinny matmul takes at most.
#define SKINNY_MAX_ROWS 8

// Dot products of one weight row `w` (k elements) with every row of `x`
// (m_rows <= M x k), accumulated per lane into `acc`; a lane reads 8
// weights and 8 inputs of each row at a time, several chunks' loads in
// flight together (a long row is otherwise a chain of dependent loads).
// M is a compile-time bound so that one row keeps few registers.
template <typename T, int M>
__device__ __forceinline__ void row_dots(const T *__restrict__ x, const int m_rows, const int k,
                                         const T *__restrict__ w, float *acc) {
    const int lane = threadIdx.x % WARP;
#pragma unroll 4
    for (int f = lane * 8; f < k; f += WARP * 8) {
        float wv[8];
        load8(w + f, wv);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m < m_rows) {
                float xv[8];
                load8(x + (size_t)m * k + f, xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[m] += wv[e] * xv[e];
            }
        }
    }
}

// y_i = x · W_iᵀ for up to three weights `W_i: [n_i, k]` at once (the
// projections that read the same input), `x: [m_rows, k]` with
// m_rows <= M: one warp per output feature, f32 sums rounded once, as a
// bf16 GEMM with f32 accumulation rounds. Unused weights have n_i = 0.
template <typename T, int M>
__device__ void skinny_matmul(const T *x, const int m_rows, const int k, const T *w0, T *y0,
                              const int n0, const T *w1, T *y1, const int n1, const T *w2, T *y2,
                              const int n2) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    const T *w;
    T *y;
    int width;
    if (n < n0) {
        w = w0; y = y0; width = n0;
    } else if ((n -= n0) < n1) {
        w = w1; y = y1; width = n1;
    } else if ((n -= n1) < n2) {
        w = w2; y = y2; width = n2;
    } else {
        return;
    }
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    row_dots<T, M>(x, m_rows, k, w + (size_t)n * k, acc);
#pragma unroll
    for (int m = 0; m < M; ++m) {
        if (m < m_rows) {
            const float s = warp_sum(acc[m]);
            if (threadIdx.x % WARP == 0) y[(size_t)m * width + n] = from_f<T>(s);
        }
    }
}

// act(x · W_gateᵀ) * (x · W_upᵀ), `W_gate`, `W_up`: [n, k], for m_rows <= M:
// the MLP's two input projections and its activation in one kernel, one
// warp per output feature, each projection rounded as a GEMM rounds it.
template <typename T, int M>
__device__ void skinny_gated(const T *x, const int m_rows, const int k, const T *w_gate,
                             const T *w_up, T *out, const int n, const int act) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= n) return;
    float g[M], u[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        g[m] = 0.0f;
        u[m] = 0.0f;
    }
    row_dots<T, M>(x, m_rows, k, w_gate + (size_t)row * k, g);
    row_dots<T, M>(x, m_rows, k, w_up + (size_t)row * k, u);
#pragma unroll
    for (int m = 0; m < M; ++m) {
        if (m < m_rows) {
            const float gs = warp_sum(g[m]);
            const float us = warp_sum(u[m]);
            if (threadIdx.x % WARP == 0) {
                out[(size_t)m * n + row] = activate(from_f<T>(gs), act) * from_f<T>(us);
            }
        }
    }
}

// The skinny kernels for at most M rows: `skinny_matmul_m<M>_<suffix>`.
#define SKINNY(T, SUFFIX, M)                                                                     \
    extern "C" __global__ void skinny_matmul_m##M##_##SUFFIX(                                    \
        const T *x, const int m_rows, const int k, const T *w0, T *y0, const int n0, const T *w1, \
        T *y1, const int n1, const T *w2, T *y2, const int n2) {                                 \
        skinny_matmul<T, M>(x, m_rows, k, w0, y0, n0, w1, y1, n1, w2, y2, n2);                   \
    }                                                                                            \
    extern "C" __global__ void skinny_gated_m##M##_##SUFFIX(                                     \
        const T *x, const int m_rows, const int k, const T *w_gate, const T *w_up, T *out,       \
        const int n, const int act) {                                                            \
        skinny_gated<T, M>(x, m_rows, k, w_gate, w_up, out, n, act);                             \
    }

#define INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void add_rms_norm_##SUFFIX(                                            \
        const T *x, const T *residual, const T *a_post, const T *a_next, T *h_out, T *y_out,     \
        const int n, const float eps_post, const float eps_next) {                               \
        add_rms_norm<T>(x, residual, a_post, a_next, h_out, y_out, n, eps_post, eps_next);       \
    }                                                                                            \
    extern "C" __global__ void qk_rope_store_##SUFFIX(                                           \
        const T *q, const T *k, const T *v, const T *q_alpha, const T *k_alpha, const float eps, \
        const uint32_t *positions, const float *inv_freq, const uint32_t *cols, T *k_cache,      \
        T *v_cache, T *q_out, const int t_len, const int nh, const int nkv, const int d,         \
        const int cap) {                                                                         \
        qk_rope_store<T>(q, k, v, q_alpha, k_alpha, eps, positions, inv_freq, cols, k_cache,     \
                         v_cache, q_out, t_len, nh, nkv, d, cap);                                \
    }                                                                                            \
    extern "C" __global__ void attention_##SUFFIX(                                               \
        const T *q, const T *k, const T *v, const T *mask, T *out, const int t_len, const int nh, \
        const int nkv, const int s_len, const int d, const float scale, const float softcap) {   \
        attention<T>(q, k, v, mask, out, t_len, nh, nkv, s_len, d, scale, softcap);              \
    }                                                                                            \
    extern "C" __global__ void masked_softmax_##SUFFIX(                                          \
        const T *scores, const T *mask, T *out, float *out32, float *th, const int m_rows,       \
        const int t_len, const int div, const int s_len, const float scale,                      \
        const float softcap) {                                                                   \
        masked_softmax<T>(scores, mask, out, out32, th, m_rows, t_len, div, s_len, scale,        \
                          softcap);                                                              \
    }                                                                                            \
    extern "C" __global__ void add_rounded_##SUFFIX(const T *base, const float *delta,          \
                                                    const float *mul, T *out, const size_t n,    \
                                                    const float scale) {                         \
        add_rounded<T>(base, delta, mul, out, n, scale);                                         \
    }                                                                                            \
    extern "C" __global__ void rms_norm_rows_##SUFFIX(const T *x, const T *alpha, T *y,        \
                                                      const int n, const float eps) {            \
        rms_norm_rows<T>(x, alpha, y, n, eps);                                                   \
    }                                                                                            \
    extern "C" __global__ void add8_##SUFFIX(const T *a, const T *b, T *out, const size_t n8) {  \
        add8<T>(a, b, out, n8);                                                                  \
    }                                                                                            \
    extern "C" __global__ void softmax_probs_grad_##SUFFIX(const T *dp, const float *p32,       \
                                                           const float *th, T *ds,               \
                                                           const int s_len, const float scale) { \
        softmax_probs_grad<T>(dp, p32, th, ds, s_len, scale);                                    \
    }                                                                                            \
    extern "C" __global__ void rms_norm_grad_##SUFFIX(const T *x, const T *g, const T *alpha,   \
                                                      T *dx, const int n, const float eps) {     \
        rms_norm_grad<T>(x, g, alpha, dx, n, eps);                                               \
    }                                                                                            \
    extern "C" __global__ void gated_##SUFFIX(const T *gate, const T *up, T *out,               \
                                              const size_t n, const int act) {                   \
        gated<T>(gate, up, out, n, act);                                                         \
    }                                                                                            \
    extern "C" __global__ void cast_scaled_##SUFFIX(const T *x, const float *mul, float *out,   \
                                                    const size_t n, const float scale) {         \
        cast_scaled<T>(x, mul, out, n, scale);                                                   \
    }                                                                                            \
    extern "C" __global__ void gated_grad_##SUFFIX(const T *gate, const T *up, const T *g,      \
                                                   T *d_gate, T *d_up, const size_t n,           \
                                                   const int act) {                              \
        gated_grad<T>(gate, up, g, d_gate, d_up, n, act);                                        \
    }                                                                                            \
    extern "C" __global__ void nll_rows_##SUFFIX(const T *logits, const uint32_t *targets,      \
                                                 const float *weights, float *lse, float *loss,  \
                                                 const int vocab) {                              \
        nll_rows<T>(logits, targets, weights, lse, loss, vocab);                                 \
    }                                                                                            \
    extern "C" __global__ void nll_grad_##SUFFIX(const T *logits, const uint32_t *targets,      \
                                                 const float *weights, const float *lse,         \
                                                 const float *g, T *out, const int vocab) {      \
        nll_grad<T>(logits, targets, weights, lse, g, out, vocab);                               \
    }                                                                                            \
    SKINNY(T, SUFFIX, 1)                                                                         \
    SKINNY(T, SUFFIX, 2)                                                                         \
    SKINNY(T, SUFFIX, 4)                                                                         \
    SKINNY(T, SUFFIX, 8)

INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
INSTANTIATE(float, f32)
