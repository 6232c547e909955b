// sums [m, n] += x [m, k] @ dequant(W [n, k]).T (+ bias) for up to 64 rows of x on the tensor cores (sm_80+),
// W in bitsandbytes' NF4 layout as stored (as nf4_mma.cu reads it), the sums fp32, added atomically.
//
// Why another kernel than nf4_mma: there a CTA's warps split K, so each warp reads its own part of x, and a CTA
// reads all of x [m, k] for 16-32 output rows. At 64 rows that is 8 KB of x for each 1 KB of weights, from L2
// (x's K columns do not fit in L1): the x loads, not the weights, set its time. Here a CTA's warps split the
// output rows instead (NT 16-row tiles each, 16 NT WARPS rows a CTA) and walk K together, GROUP blocks of 64
// columns a step. Each step's x columns and the CTA's weight bytes for them are copied into shared memory
// (cp.async, STAGES steps in flight: the weights stream without holding registers), and every warp reads x there.
// K is split over gridDim.y CTAs, whose fp32 sums add in global memory, so that a weight of few output rows still
// keeps every SM streaming. Each lane decodes and multiplies as in nf4_mma: its A operands the weights' bf16
// pairs from the decode table, its B operands 32 contiguous bytes of x.
//
// On sm_90a (WGMMA) the products are wgmma.mma_async, m64 n(8 MT) k16: a warpgroup's four warps hold the 16-row
// A tiles of one 64-row weight tile as their registers (decoded as for mma.sync: the same fragment layout), and x
// is the B operand in shared memory, read by the tensor cores themselves. One instruction multiplies a lane's
// decoded weights with all of x's rows, where mma.sync took one an n8 tile and x's loads into registers; the
// tensor cores run while the warp decodes the next block. The x columns are stored permuted so that the k order of
// a wgmma matches the bytes each lane decodes (see XQ below).
//
// FINISH (K in one part, gridDim.y 1): the epilogue finishes the projection as finish_projection (lora.py) does
// after the sums, in the same roundings: the sums rounded to bf16, each row's LoRA delta added (the shrink's partial
// sums of its slot @ B, read from global memory, a warp's reads 256 contiguous bytes a rank) and rounded, the
// residual added, bf16 stored: one launch a projection fewer.
//
// Defined by the host: WARPS, NT, MT (n8 tiles of x rows: ceil(m / 8)), GROUP, STAGES, MIN_BLOCKS, NESTED,
// HAS_BIAS, SEGMENTS (weights of one launch, up to 3; every n a multiple of 4), WGMMA (with WARPS a multiple of 4),
// FINISH, HAS_LORA and R_PAD (the shrink's padded rank), HAS_RESIDUAL (the last two FINISH only).

#define CTA_ROWS (16 * NT * WARPS)
#if WGMMA
// A staged x step as wgmma's K-major B operand without swizzle: 8 x 8 core matrices (8 x rows of 16 bytes, 128
// contiguous bytes). Column q = 2 (4 i + s) + h of core matrices holds, for block i of the step and wgmma s of it,
// the k half h: x columns 64 i + 16 t + 4 s + 2 h + {0, 1} at its bytes 4 t, 4 t + 2 (t = 0..3). That is the
// order in which lane t's A registers hold the codes of its 8 bytes 8 t..8 t + 7 of a block (byte 2 s + h: columns
// 16 t + 4 s + 2 h + {0, 1}). A column of core matrices is XQ bytes (x rows at 16 bytes, then 16 bytes of padding,
// so that the 4-byte copies of a warp, one x row's 128 bytes, fall in distinct banks).
#define XQ (8 * MT * 16 + 16)
#define X_BYTES (8 * GROUP * XQ)
#else
// bf16 a row of a staged x step: 16 bytes of padding, so that the 16-byte reads of the 8 lanes of a phase (two x
// rows, four 32-byte column groups) fall in distinct banks
#define XSTRIDE (64 * GROUP + 8)
#define X_BYTES (8 * MT * XSTRIDE * 2)
#endif
// steps copied ahead of the one computed: under WGMMA the last step's products may still read its stage
#define AHEAD (WGMMA ? STAGES - 2 : STAGES - 1)
// a stage's weights: [GROUP][CTA_ROWS][32 bytes], so the 8-byte reads of a half warp (four consecutive rows) take
// 128 contiguous bytes
#define W_BYTES (GROUP * CTA_ROWS * 32)
#define STAGE_BYTES (X_BYTES + W_BYTES)
#define OSTRIDE (CTA_ROWS + 4)  // fp32 a row of the CTA's sums in the epilogue: the lanes' writes in distinct banks

__device__ __forceinline__ void copy4(unsigned dst, const void* src) {  // dst: a shared address
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ unsigned scale_pair(float s) {  // a scale as two bf16
    unsigned pair;
    asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(pair) : "f"(s));
    return pair;
}

__device__ __forceinline__ unsigned scaled(unsigned pair, unsigned scale) {  // two bf16 weights times their scale
    unsigned out;  // + -0: the product's sign kept where it is zero (fma: sm_80 has no bf16x2 mul)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(pair), "r"(scale), "r"(0x80008000u));
    return out;
}

// A thread's part of each step's copies into a stage, its addresses made once: x rows 0..8 MT - 1 at the step's
// 64 GROUP columns (rows past m: zeros; not copied under WGMMA), then the step's GROUP blocks of the CTA's weight
// rows (rows past n: the last row again). One commit a step.
struct Copies {
    static constexpr int W_PIECES = CTA_ROWS * 2 * GROUP;  // 16 bytes each
    static constexpr int W_EACH = (W_PIECES + WARPS * 32 - 1) / (WARPS * 32);
#if WGMMA
    // 4-byte pieces (two x columns), a pass of the threads over WARPS / GROUP whole x rows; rows past m are not
    // copied: they make output columns that are never stored
    static constexpr int X_PASS_ROWS = WARPS / GROUP, X_EACH = 8 * MT / X_PASS_ROWS;
    static_assert(WARPS % GROUP == 0 && (8 * MT) % X_PASS_ROWS == 0, "x's pieces a thread");
    const unsigned short* x_src;  // the thread's first piece
    size_t x_pass;                // bf16 from a pass's piece to the next's
    unsigned x_dst;
    int x_count;  // the thread's passes within m
#else
    static constexpr int X_PIECES = 8 * MT * 8 * GROUP;  // 16 bytes each
    static constexpr int X_EACH = (X_PIECES + WARPS * 32 - 1) / (WARPS * 32);
    const unsigned short* x_src[X_EACH];
    unsigned x_dst[X_EACH];  // shared-memory offsets in the stage
    int x_bytes[X_EACH];     // 16, 0 for a row past m (zeros), -1 for no piece
#endif
    const unsigned char* w_src[W_EACH];
    unsigned w_dst[W_EACH];

    __device__ __forceinline__ Copies(const unsigned short* x, int ldx, int m, const unsigned char* w, int n,
                                      int blocks_k, int first_row, int kb0, int tid) {
#if WGMMA
        const int pair = tid % (32 * GROUP), p = pair & 31;  // x columns 2 pair, 2 pair + 1 of the step
        const int row = tid / (32 * GROUP);
        x_src = x + size_t(row) * ldx + 64 * kb0 + 2 * pair;
        x_pass = size_t(X_PASS_ROWS) * ldx;
        x_dst = (2 * (4 * (pair >> 5) + ((p >> 1) & 3)) + (p & 1)) * XQ + 16 * row + 4 * (p >> 3);
        x_count = (m - row + X_PASS_ROWS - 1) / X_PASS_ROWS;
#else
#pragma unroll
        for (int e = 0; e < X_EACH; ++e) {
            const int c = tid + e * WARPS * 32, r = c / (8 * GROUP), q = c % (8 * GROUP);
            x_src[e] = x + size_t(r < m ? r : 0) * ldx + 64 * kb0 + 8 * q;
            x_dst[e] = (r * XSTRIDE + 8 * q) * 2;
            x_bytes[e] = c >= X_PIECES ? -1 : r < m ? 16 : 0;
        }
#endif
#pragma unroll
        for (int e = 0; e < W_EACH; ++e) {
            const int c = min(tid + e * WARPS * 32, W_PIECES - 1), r = c / (2 * GROUP), q = c % (2 * GROUP);
            w_src[e] = w + (size_t(min(first_row + r, n - 1)) * blocks_k + kb0) * 32 + 16 * q;
            w_dst[e] = X_BYTES + ((q >> 1) * CTA_ROWS + r) * 32 + 16 * (q & 1);
        }
    }

    __device__ __forceinline__ void issue(unsigned stage, int step) const {  // stage: its shared-memory address
        issue_x(stage, step);
        issue_weights(stage, step);
        asm volatile("cp.async.commit_group;");
    }

    __device__ __forceinline__ void issue_x(unsigned stage, int step) const {
#if WGMMA
        const unsigned short* src = x_src + 64 * GROUP * step;
#pragma unroll
        for (int e = 0; e < X_EACH; ++e, src += x_pass)
            if (e < x_count) copy4(stage + x_dst + 16 * X_PASS_ROWS * e, src);
#else
#pragma unroll
        for (int e = 0; e < X_EACH; ++e)
            if (X_PIECES % (WARPS * 32) == 0 || x_bytes[e] >= 0)
                copy16<256>(stage + x_dst[e], x_src[e] + 64 * GROUP * step, x_bytes[e]);
#endif
    }

    __device__ __forceinline__ void issue_weights(unsigned stage, int step) const {
#pragma unroll
        for (int e = 0; e < W_EACH; ++e)  // a thread past the pieces copies the last one again: harmless
            copy16<256>(stage + w_dst[e], w_src[e] + 32 * GROUP * step, 16);
    }
};

__device__ __forceinline__ void add_sums(float* p, float4 v) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
                 "f"(v.w)
                 : "memory");
#else
    atomicAdd(p, v.x), atomicAdd(p + 1, v.y), atomicAdd(p + 2, v.z), atomicAdd(p + 3, v.w);
#endif
}

// The first of a warp's 16 rows of its weight tile `tile` among the CTA's rows: under WGMMA a warpgroup's four
// warps hold one 64-row tile's four 16-row slices (wgmma's A operand), otherwise a warp its NT tiles in a row.
__device__ __forceinline__ int tile_row(int warp, int tile) {
    return WGMMA ? (((warp >> 2) * NT + tile) * 4 + (warp & 3)) * 16 : (warp * NT + tile) * 16;
}

#if WGMMA
// The low word of the descriptor of a staged x (see XQ) from its first core matrix, at shared address `at`: the
// start address, then the k16 slice's second k half XQ bytes on. A slice `bytes` further on adds bytes / 16 (the
// start field never overflows: shared memory is under 256 KB).
__device__ __forceinline__ unsigned x_descriptor_low(unsigned at) { return ((at & 0x3FFFFu) >> 4) | (XQ >> 4) << 16; }

// The whole descriptor: the next 8 x rows 128 bytes on; no swizzle
__device__ __forceinline__ unsigned long long x_descriptor(unsigned low) {
    return low | (unsigned long long)(128 >> 4) << 32;
}

// keeps the compiler from moving reads of the accumulators before the wgmma that writes them has been waited for
__device__ __forceinline__ void fence_sums(float (&acc)[NT][MT][4]) {
#pragma unroll
    for (int tile = 0; tile < NT; ++tile)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(acc[tile][j][r])::"memory");
}
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) nf4_wide(
    const unsigned short* __restrict__ x,    // [m, ldx] bf16, rows 16-byte aligned
    int ldx, int m,
    float* __restrict__ out,                 // [m, ldo] fp32: zeros before the launch where K is split
    int ldo, int k,
    int blocks_split,                        // K / 64 / gridDim.y: the blocks of K a CTA takes
    const unsigned char* __restrict__ w,     // [n, k / 2] NF4 codes
    const void* __restrict__ absmax,         // [n * k / 64] fp32, or uint8 codes of code2 when NESTED
    const float* __restrict__ absmax2,       // [n * k / 64 / 256] (NESTED)
    const float* __restrict__ code2,         // [256] (NESTED)
    const float* __restrict__ offset_ptr,    // [] added to every absmax (NESTED)
    const unsigned short* __restrict__ bias, // [n] bf16 (HAS_BIAS)
    int n,
    // segments 1 and 2 (SEGMENTS > 1, 3): as segment 0's above, then the CTAs before segment 1's and segment 2's
    const unsigned char* __restrict__ w_1, const void* __restrict__ absmax_1, const float* __restrict__ absmax2_1,
    const float* __restrict__ code2_1, const float* __restrict__ offset_1, const unsigned short* __restrict__ bias_1,
    int n_1,
    const unsigned char* __restrict__ w_2, const void* __restrict__ absmax_2, const float* __restrict__ absmax2_2,
    const float* __restrict__ code2_2, const float* __restrict__ offset_2, const unsigned short* __restrict__ bias_2,
    int n_2, int end_0, int end_1,
    unsigned short* __restrict__ finished, int ldf,  // FINISH: the finished projection [m, ldf] bf16
    // HAS_LORA: each row's delta from the shrink's partial sums [G, m, chunks_pad, R_PAD] fp32 (the G weights'
    // partial_stride apart) and B [S+1, rank, ldo] bf16 (strides stride_bs, stride_br, 1; the weights' columns side
    // by side), at the row's slot, up to its rank
    const float* __restrict__ partial, int chunks, int chunks_pad, int partial_stride,
    const unsigned short* __restrict__ lora_b, int stride_bs, int stride_br,
    const long long* __restrict__ slots, const int* __restrict__ ranks,
    const unsigned short* __restrict__ residual, int ldr) {  // HAS_RESIDUAL: [m, ldr] bf16, added last
    // the decode table, code2, then the stages; after the main loop the CTA's sums [8 MT][OSTRIDE] (host-sized)
    extern __shared__ __align__(16) unsigned smem[];
    float* code2_s = reinterpret_cast<float*>(smem + LUT_WORDS);
    unsigned char* stages = reinterpret_cast<unsigned char*>(smem + LUT_WORDS + 256);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int cta = blockIdx.x, col0 = 0;  // this CTA's tile in its weight, and that weight's first column of out
    Segment segment{w, absmax, absmax2, code2, offset_ptr, bias, n};
    const int index = select_segment(cta, col0, segment, {w_1, absmax_1, absmax2_1, code2_1, offset_1, bias_1, n_1},
                                     {w_2, absmax_2, absmax2_2, code2_2, offset_2, bias_2, n_2}, end_0, end_1);
    w = segment.w, absmax = segment.absmax, absmax2 = segment.absmax2, code2 = segment.code2;
    offset_ptr = segment.offset, bias = segment.bias, n = segment.n;
#if HAS_LORA
    partial += index * partial_stride;
#else
    (void)index;
#endif
    const int blocks_k = k >> 6, kb0 = blockIdx.y * blocks_split, steps = blocks_split / GROUP;
    const int first_row = cta * CTA_ROWS;
    // the first steps' weight copies in flight first, x's after wait_for_inputs below (one commit a stage, a step
    // past the last copying nothing; the first commit takes every stage's weights, the rest x's alone)
    const Copies copies(x, ldx, m, w, n, blocks_k, first_row, kb0, tid);
    const unsigned stages_at = unsigned(__cvta_generic_to_shared(stages));
#pragma unroll
    for (int s = 0; s < AHEAD; ++s)
        if (s < steps) copies.issue_weights(stages_at + s * STAGE_BYTES, s);
    unsigned block[NT][2];  // the CTA's first block of each of the lane's rows
    int wrow[NT][2];        // those rows in the CTA's
#pragma unroll
    for (int tile = 0; tile < NT; ++tile) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            wrow[tile][h] = tile_row(warp, tile) + 8 * h + g;
            block[tile][h] = unsigned(min(first_row + wrow[tile][h], n - 1)) * blocks_k + kb0;
        }
    }
#if NESTED
    const float offset = *offset_ptr;
#else
    const float offset = 0.0f;
#endif
    Scales scales[NT][2];
#pragma unroll
    for (int tile = 0; tile < NT; ++tile)
#pragma unroll
        for (int h = 0; h < 2; ++h) scales[tile][h] = load_scales(absmax, absmax2, block[tile][h]);
#if NESTED
    for (int i = tid; i < 256; i += WARPS * 32) code2_s[i] = code2[i];
#endif
    write_lut(smem, tid, WARPS * 32);
    wait_for_inputs();
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < steps) copies.issue_x(stages_at + s * STAGE_BYTES, s);
        asm volatile("cp.async.commit_group;");
    }
#if HAS_LORA
    // each x row's slot and rank, loaded now and stored once the main loop is done: their latency hides there
    const long long my_slot = tid < m ? slots[tid] : 0;
    const int my_rank = tid < m ? ranks[tid] : 0;
#endif
    const unsigned lane4 = 4 * lane;

    float acc[NT][MT][4];
#pragma unroll
    for (int tile = 0; tile < NT; ++tile)
#pragma unroll
        for (int j = 0; j < MT; ++j) acc[tile][j][0] = acc[tile][j][1] = acc[tile][j][2] = acc[tile][j][3] = 0.0f;

    for (int step = 0; step < steps; ++step) {
        // this step's copies landed (the later ones may still be in flight) and, after the barrier, every warp is
        // done with the stage the next copy overwrites (under WGMMA the one of two steps back: the last step's
        // last products may still read theirs)
        asm volatile("cp.async.wait_group %0;" ::"n"(AHEAD - 1));
#if WGMMA
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copies seen by the tensor cores' reads
#endif
        __syncthreads();
        const int ahead = step + AHEAD;
        if (ahead < steps) copies.issue(stages_at + (ahead % STAGES) * STAGE_BYTES, ahead);
        else asm volatile("cp.async.commit_group;");
        // the next step's scales, loaded before this step's math (the last step loads its own again: no
        // predicated loads in the loop)
        const int next_step = step + 1 < steps ? step + 1 : step;
        Scales next_scales[NT][2];
#pragma unroll
        for (int tile = 0; tile < NT; ++tile)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                next_scales[tile][h] = load_scales(absmax, absmax2, block[tile][h] + next_step * GROUP);
        const unsigned char* here = stages + (step % STAGES) * STAGE_BYTES;
        const unsigned char* ws = here + X_BYTES;
#if WGMMA
        const unsigned x_low = x_descriptor_low(stages_at + (step % STAGES) * STAGE_BYTES);
#endif
#pragma unroll
        for (int i = 0; i < GROUP; ++i) {
            // [tile][mma step][A register], as in nf4_mma, each weight times its block's scale (rounded to bf16,
            // as bitsandbytes' dequantized weight is): one bf16 pair product a register, where scaling the
            // products after each block's mmas took four FFMA a tile and x row tile
            unsigned a[NT][4][4];
#pragma unroll
            for (int tile = 0; tile < NT; ++tile) {
                // bytes 8 t..8 t + 7 of block i of the lane's two rows
                const uint2 code0 = *reinterpret_cast<const uint2*>(ws + (i * CTA_ROWS + wrow[tile][0]) * 32 + 8 * t);
                const uint2 code1 = *reinterpret_cast<const uint2*>(ws + (i * CTA_ROWS + wrow[tile][1]) * 32 + 8 * t);
                const unsigned s0 = scale_pair(scale_of(scales[tile][0], i, code2_s, offset));
                const unsigned s1 = scale_pair(scale_of(scales[tile][1], i, code2_s, offset));
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const unsigned word0 = s < 2 ? code0.x : code0.y;
                    const unsigned word1 = s < 2 ? code1.x : code1.y;
                    a[tile][s][0] = scaled(pair_of(smem, lane4, word0, 2 * (s & 1)), s0);
                    a[tile][s][1] = scaled(pair_of(smem, lane4, word1, 2 * (s & 1)), s1);
                    a[tile][s][2] = scaled(pair_of(smem, lane4, word0, 2 * (s & 1) + 1), s0);
                    a[tile][s][3] = scaled(pair_of(smem, lane4, word1, 2 * (s & 1) + 1), s1);
                }
            }
#if WGMMA
            // the block's products on the tensor cores, then the previous block's waited for: its registers free
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
            for (int tile = 0; tile < NT; ++tile)
#pragma unroll
                for (int s = 0; s < 4; ++s)
                    wgmma(acc[tile], a[tile][s], x_descriptor(x_low + (8 * i + 2 * s) * XQ / 16));
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
#else
            const unsigned short* xs = reinterpret_cast<const unsigned short*>(here);
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                // x row 8 j + g, columns 16 t..16 t + 15 of block i of the step
                const uint4* p = reinterpret_cast<const uint4*>(xs + (8 * j + g) * XSTRIDE + 64 * i + 16 * t);
                const uint4 lo = p[0], hi = p[1];
#pragma unroll
                for (int tile = 0; tile < NT; ++tile) {
                    mma(acc[tile][j], a[tile][0], lo.x, lo.y);
                    mma(acc[tile][j], a[tile][1], lo.z, lo.w);
                    mma(acc[tile][j], a[tile][2], hi.x, hi.y);
                    mma(acc[tile][j], a[tile][3], hi.z, hi.w);
                }
            }
#endif
        }
#pragma unroll
        for (int tile = 0; tile < NT; ++tile)
#pragma unroll
            for (int h = 0; h < 2; ++h) scales[tile][h] = next_scales[tile][h];
    }
#if WGMMA
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_sums(acc);
#endif

    // The CTA's sums through shared memory, so that each thread adds four consecutive outputs with one reduction
    // (C fragment: weight rows g, g + 8 x x rows 8 j + 2 t, 8 j + 2 t + 1)
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int tile = 0; tile < NT; ++tile) {
            float* base = red + (8 * j + 2 * t) * OSTRIDE + tile_row(warp, tile) + g;
            base[0] = acc[tile][j][0];
            base[OSTRIDE] = acc[tile][j][1];
            base[8] = acc[tile][j][2];
            base[OSTRIDE + 8] = acc[tile][j][3];
        }
#if HAS_LORA
    // each x row's slot, rank and shrunk activations (rounded to bf16 as the unfused x @ A.T leaves them)
    __shared__ float shrunk[8 * MT][R_PAD];
    __shared__ long long slot_s[8 * MT];
    __shared__ int rank_s[8 * MT];
    if (tid < m) slot_s[tid] = my_slot, rank_s[tid] = my_rank;
    __syncthreads();
    for (int i = tid; i < m * R_PAD; i += WARPS * 32) {
        const int token = i / R_PAD, r = i % R_PAD;
        if (r >= rank_s[token]) continue;  // past the row's rank: not read below
        const float* p = partial + size_t(token) * chunks_pad * R_PAD + r;
        float sum = 0.0f;
#pragma unroll 16
        for (int c = 0; c < chunks; ++c) sum += p[c * R_PAD];  // 16 loads in flight: down's K has 56 chunks
        shrunk[token][r] = bf16_round(sum);
    }
#endif
    __syncthreads();
    for (int i = tid; i < m * (CTA_ROWS / 4); i += WARPS * 32) {
        const int token = i / (CTA_ROWS / 4), c = 4 * (i % (CTA_ROWS / 4)), row = cta * CTA_ROWS + c;
        if (row >= n) continue;  // n is a multiple of 4: rows row..row + 3 are all outputs or none
        float4 v = *reinterpret_cast<const float4*>(red + token * OSTRIDE + c);
#if HAS_BIAS
        if (blockIdx.y == 0) {  // added once, by the CTAs of the first part of K
            v.x += __uint_as_float(unsigned(bias[row]) << 16), v.y += __uint_as_float(unsigned(bias[row + 1]) << 16);
            v.z += __uint_as_float(unsigned(bias[row + 2]) << 16), v.w += __uint_as_float(unsigned(bias[row + 3]) << 16);
        }
#endif
#if FINISH
        // rounded as finish_projection rounds: the sums to bf16, then their sum with the row's delta, then with the
        // residual
        float d[4] = {};
#if HAS_LORA  // outputs row..row + 3 of each rank of the row's slot: 8 bytes a lane, a warp's 256 contiguous bytes
        const unsigned short* b = lora_b + size_t(slot_s[token]) * stride_bs + col0 + row;
#pragma unroll 8
        for (int r = 0, rank_t = rank_s[token]; r < rank_t; ++r) {
            const uint2 pair = __ldg(reinterpret_cast<const uint2*>(b + size_t(r) * stride_br));
            const float s = shrunk[token][r];
            d[0] += __uint_as_float(pair.x << 16) * s, d[1] += __uint_as_float(pair.x & 0xFFFF0000u) * s;
            d[2] += __uint_as_float(pair.y << 16) * s, d[3] += __uint_as_float(pair.y & 0xFFFF0000u) * s;
        }
#endif
        const float sums[4] = {v.x, v.y, v.z, v.w};
        unsigned short h[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float y = bf16_round(bf16_round(sums[e]) + d[e]);
#if HAS_RESIDUAL
            y += __uint_as_float(unsigned(residual[size_t(token) * ldr + row + e]) << 16);
#endif
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h[e]) : "f"(y));
        }
        *reinterpret_cast<uint2*>(finished + size_t(token) * ldf + col0 + row) =
            make_uint2(h[0] | unsigned(h[1]) << 16, h[2] | unsigned(h[3]) << 16);
#else
        float* sums = out + size_t(token) * ldo + col0 + row;
        if (gridDim.y == 1) *reinterpret_cast<float4*>(sums) = v;  // K in one part: nothing to add to
        else add_sums(sums, v);
#endif
    }
}
