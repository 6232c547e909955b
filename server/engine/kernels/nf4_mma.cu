// y [m, n] = x [m, k] @ dequant(W [n, k]).T (+ bias) for 1-64 rows of x on the tensor cores (sm_80+), W in
// bitsandbytes' NF4 layout as stored: two codes a byte (the even column in the high nibble), one absmax a 64
// weights (8-bit quantized per 256 blocks under double quantization).
//
// Why not a table in registers (the Triton kernels): each lane decodes a byte of two codes into the bf16 pair a
// tensor-core operand register holds with one shared-memory load from a 256-entry table of pairs, stored once
// per lane (entry e of lane l at word 32 e + l, so every lane reads its own bank: no conflicts). A weight costs
// ~1.5 instructions (shift, mask, load per two), under the ~3.5 a weight the H100/H200 can issue at full memory
// bandwidth; the multiply-adds are the tensor cores'.
//
// The reduction order of an mma is free, so a lane's k indices are chosen to match the bytes it loads: lane
// (g = lane / 4, t = lane % 4) loads bytes 8t..8t+7 of a 32-byte block row (64 weights) for rows g and g+8 of a
// 16-row tile; step s of the block's four m16n8k16 products takes its bytes 2s and 2s+1, i.e. columns
// 16t+4s..16t+4s+3, and the same four columns of x are its B operand (one 8-byte load). A block's four steps
// sum into a fresh accumulator, scaled by the two rows' absmax into the running one.
//
// A CTA owns NT tiles of 16 output rows; its WARPS warps split K (K / 64 / WARPS blocks each, GROUP blocks
// loaded ahead) and add their partial sums in shared memory at the end, where the bias and each row's LoRA delta
// (the expand half of the LoRA kernels: the shrink's partial sums @ B of the row's slot) are added. Defined by
// the host: WARPS, GROUP, NT, MT (n8 tiles of x rows: ceil(m / 8)), MIN_BLOCKS (CTAs an SM must fit by registers),
// NESTED, HAS_BIAS, HAS_LORA, R_PAD, BTILE, SEGMENTS (weights of one launch, up to 3), HAS_RESIDUAL (a tensor added
// to the rounded output, as a decoder layer's residual add does), and NF4_CODES (bitsandbytes' code book as bf16
// bits).

#define ROWS (16 * NT)
#define RED_WORDS (WARPS * MT * 8 * ROWS)
#define SMEM_WORDS (LUT_WORDS > RED_WORDS ? LUT_WORDS : RED_WORDS)

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) nf4_mma(
    const unsigned short* __restrict__ x,    // [m, ldx] bf16
    int ldx, int m,
    const unsigned char* __restrict__ w,     // [n, k / 2] NF4 codes
    const void* __restrict__ absmax,         // [n * k / 64] fp32, or uint8 codes of code2 when NESTED
    const float* __restrict__ absmax2,       // [n * k / 64 / 256] (NESTED)
    const float* __restrict__ code2,         // [256] (NESTED)
    const float* __restrict__ offset_ptr,    // [] added to every absmax (NESTED)
    const unsigned short* __restrict__ bias, // [n] bf16 (HAS_BIAS)
    const float* __restrict__ partial,       // [m, chunks_pad, R_PAD] the LoRA shrink's partial sums (HAS_LORA)
    int chunks, int chunks_pad, int rank,
    const unsigned short* __restrict__ lora_b,  // [S+1, rank, ldo] bf16, strides (stride_bs, stride_br, 1)
    int stride_bs, int stride_br,
    const long long* __restrict__ slots,     // [m] each row's slot (HAS_LORA)
    const int* __restrict__ ranks,           // [m] each row's adapter rank: B rows past it are not read (HAS_LORA)
    unsigned short* __restrict__ out,        // [m, ldo] bf16
    int ldo, int n, int k,
    int partial_stride,                      // between the segments' partial sums (SEGMENTS > 1)
    // segments 1 and 2 (SEGMENTS > 1, 3): their weights, scales and bias as segment 0's above, their n, and the
    // CTAs before segment 1's and segment 2's
    const unsigned char* __restrict__ w_1, const void* __restrict__ absmax_1, const float* __restrict__ absmax2_1,
    const float* __restrict__ code2_1, const float* __restrict__ offset_1, const unsigned short* __restrict__ bias_1,
    int n_1,
    const unsigned char* __restrict__ w_2, const void* __restrict__ absmax_2, const float* __restrict__ absmax2_2,
    const float* __restrict__ code2_2, const float* __restrict__ offset_2, const unsigned short* __restrict__ bias_2,
    int n_2, int end_0, int end_1,
    const unsigned short* __restrict__ residual,  // [m, ldr] bf16 (HAS_RESIDUAL; one segment)
    int ldr) {
    __shared__ __align__(16) unsigned smem[SMEM_WORDS];
    __shared__ float code2_s[NESTED ? 256 : 1];
#if BTILE
    // [m][rank][ROWS] bf16: each x row's slot's B rows for this CTA's outputs (the host sizes it, 16-byte rows)
    extern __shared__ __align__(16) unsigned short btile[];
#endif
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int cta = blockIdx.x, col0 = 0;  // this CTA's tile in its weight, and that weight's first column of out
    Segment segment{w, absmax, absmax2, code2, offset_ptr, bias, n};
    const int index = select_segment(cta, col0, segment, {w_1, absmax_1, absmax2_1, code2_1, offset_1, bias_1, n_1},
                                     {w_2, absmax_2, absmax2_2, code2_2, offset_2, bias_2, n_2}, end_0, end_1);
    w = segment.w, absmax = segment.absmax, absmax2 = segment.absmax2, code2 = segment.code2;
    offset_ptr = segment.offset, bias = segment.bias, n = segment.n;
    partial += index * partial_stride;
#if HAS_LORA
    __shared__ long long slot_s[MT * 8];
    __shared__ int rank_s[MT * 8];
#endif
    const int blocks_k = k >> 6, per_warp = blocks_k / WARPS;
    const unsigned char* wp[NT][2];
    unsigned block[NT][2];  // the warp's first block of each of the lane's rows (32-bit: under 2^37 weights)
#pragma unroll
    for (int tile = 0; tile < NT; ++tile) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = min(cta * ROWS + 16 * tile + 8 * h + g, n - 1);
            block[tile][h] = unsigned(row) * blocks_k + warp * per_warp;
            wp[tile][h] = w + size_t(block[tile][h]) * 32 + 8 * t;
        }
    }
#if NESTED
    const float offset = *offset_ptr;
#else
    const float offset = 0.0f;
#endif

    uint2 codes[GROUP][NT][2];
    Scales scales[NT][2];
#pragma unroll
    for (int tile = 0; tile < NT; ++tile) {  // the first group's loads are in flight while the tables are written
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            scales[tile][h] = load_scales(absmax, absmax2, block[tile][h]);
#pragma unroll
            for (int i = 0; i < GROUP; ++i) codes[i][tile][h] = load_stream(wp[tile][h] + 32 * i);
        }
    }
#if NESTED
    for (int i = tid; i < 256; i += WARPS * 32) code2_s[i] = code2[i];
#endif

    write_lut(smem, tid, WARPS * 32);
    wait_for_inputs();  // the weights' first group is in flight, the table written: now the step's own inputs
#if HAS_LORA
    for (int token = tid; token < m; token += WARPS * 32) slot_s[token] = slots[token], rank_s[token] = ranks[token];
#endif
    __syncthreads();
#if BTILE
    // The epilogue's B rows, copied into shared memory while the weights stream (cp.async holds no registers):
    // read from global memory in the epilogue, they ended every CTA on a chain of round trips (3% of a decode
    // step at batch 1, 1% at 32 on the H200). 16 bytes a copy; those past the last output row copy nothing and
    // zero-fill; rows past the x row's rank are not copied (nor read).
    for (int c = tid; c < m * rank * (ROWS / 8); c += WARPS * 32) {
        const int token = c / (rank * (ROWS / 8)), r = c / (ROWS / 8) % rank, col = cta * ROWS + 8 * (c % (ROWS / 8));
        if (r >= rank_s[token]) continue;
        const int bytes = max(0, min(16, 2 * (n - col)));
        const unsigned short* src =  // a copy of nothing still names an address inside the row: the CTA's first
            lora_b + size_t(slot_s[token]) * stride_bs + size_t(r) * stride_br + col0 + (bytes ? col : cta * ROWS);
        const unsigned dst = unsigned(__cvta_generic_to_shared(btile + 8 * c));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
    }
    asm volatile("cp.async.commit_group;");
#endif
#if HAS_LORA
    // Each x row's shrunk activations, rounded to bf16 as the unfused x @ A.T leaves them, summed before the main
    // loop: their loads (L2 round trips) wait beside the weights' first group, not after the last one, where every
    // CTA's epilogue waited for them. Read after the barrier that ends the loop.
    __shared__ float shrunk[MT * 8][R_PAD];
    for (int i = tid; i < m * R_PAD; i += WARPS * 32) {
        if (i % R_PAD >= rank_s[i / R_PAD]) continue;  // past the row's rank: not read below
        const float* p = partial + size_t(i / R_PAD) * chunks_pad * R_PAD + i % R_PAD;
        float sum = 0.0f;
#pragma unroll 16
        for (int c = 0; c < chunks; ++c) sum += p[c * R_PAD];  // 16 loads in flight: down's K has 56 chunks
        shrunk[i / R_PAD][i % R_PAD] = bf16_round(sum);
    }
#endif
    const unsigned lane4 = 4 * lane;

    // x rows of this lane's B operands: row 8 j + g of x, columns from the warp's first block + 16 t. A lane past
    // the last row reads row 0 (unpredicated loads, nothing zeroed each block): an mma keeps its B columns apart,
    // so that lane's products land in output columns of no row, never stored.
    const unsigned short* xs[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) xs[j] = x + size_t(8 * j + g < m ? 8 * j + g : 0) * ldx + warp * per_warp * 64 + 16 * t;

    float acc[MT][NT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int tile = 0; tile < NT; ++tile) acc[j][tile][0] = acc[j][tile][1] = acc[j][tile][2] = acc[j][tile][3] = 0.0f;

    // One group's math: its codes decoded and multiplied, scaled into acc. The loop below loads the next group
    // before each group's math and the last group's math follows it: no predicated loads or selects in the loop
    // (15-25% fewer instructions there than one loop with a "more to load" test, sm_90 machine code).
    auto group_math = [&](const uint2 (&cw)[GROUP][NT][2], const Scales (&sc)[NT][2], int kb) {
#pragma unroll
        for (int i = 0; i < GROUP; ++i) {
            unsigned a[NT][4][4];  // [tile][step][A register]: rows g, g+8 x columns 16t+4s+{0,1}, then +{2,3}
#pragma unroll
            for (int tile = 0; tile < NT; ++tile)
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const unsigned word0 = s < 2 ? cw[i][tile][0].x : cw[i][tile][0].y;
                    const unsigned word1 = s < 2 ? cw[i][tile][1].x : cw[i][tile][1].y;
                    a[tile][s][0] = pair_of(smem, lane4, word0, 2 * (s & 1));
                    a[tile][s][1] = pair_of(smem, lane4, word1, 2 * (s & 1));
                    a[tile][s][2] = pair_of(smem, lane4, word0, 2 * (s & 1) + 1);
                    a[tile][s][3] = pair_of(smem, lane4, word1, 2 * (s & 1) + 1);
                }
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                const uint4* p = reinterpret_cast<const uint4*>(xs[j] + (kb + i) * 64);
                const uint4 lo = p[0], hi = p[1];  // x columns 16t..16t+7, 16t+8..16t+15 of this block
#pragma unroll
                for (int tile = 0; tile < NT; ++tile) {
                    const float s0 = scale_of(sc[tile][0], i, code2_s, offset);
                    const float s1 = scale_of(sc[tile][1], i, code2_s, offset);
                    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    mma(part, a[tile][0], lo.x, lo.y);
                    mma(part, a[tile][1], lo.z, lo.w);
                    mma(part, a[tile][2], hi.x, hi.y);
                    mma(part, a[tile][3], hi.z, hi.w);
                    acc[j][tile][0] += part[0] * s0;
                    acc[j][tile][1] += part[1] * s0;
                    acc[j][tile][2] += part[2] * s1;
                    acc[j][tile][3] += part[3] * s1;
                }
            }
        }
    };
    int kb = 0;
    for (; kb + GROUP < per_warp; kb += GROUP) {
        uint2 next[GROUP][NT][2];
        Scales next_scales[NT][2];
#pragma unroll
        for (int tile = 0; tile < NT; ++tile)  // the next group's loads, issued before this group's math
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                next_scales[tile][h] = load_scales(absmax, absmax2, block[tile][h] + kb + GROUP);
#pragma unroll
                for (int i = 0; i < GROUP; ++i) next[i][tile][h] = load_stream(wp[tile][h] + 32 * (kb + GROUP + i));
            }
        group_math(codes, scales, kb);
#pragma unroll
        for (int tile = 0; tile < NT; ++tile)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                scales[tile][h] = next_scales[tile][h];
#pragma unroll
                for (int i = 0; i < GROUP; ++i) codes[i][tile][h] = next[i][tile][h];
            }
    }
    group_math(codes, scales, kb);  // the last group: nothing left to load

    // the warps' partial sums: [warp][x row][output row of the CTA], in the table's memory
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int tile = 0; tile < NT; ++tile) {  // C fragment: rows g, g+8 x x rows 8 j + 2t, 8 j + 2t + 1
            float* base = red + (warp * MT * 8 + 8 * j + 2 * t) * ROWS + 16 * tile + g;
            base[0] = acc[j][tile][0];
            base[ROWS] = acc[j][tile][1];
            base[8] = acc[j][tile][2];
            base[ROWS + 8] = acc[j][tile][3];
        }
#if BTILE
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
    __syncthreads();
#if BTILE || !HAS_LORA
    // Eight consecutive outputs of one x row a thread: the warps' partial sums and the B tile read 16 bytes at a
    // time, each shrunk activation once for the eight (one output a thread read them 4 bytes and 2 bytes at a
    // time, and the loop over the rank was most of the epilogue's instructions at 32 rows). Each output's sums
    // are made in the same order as before: the same bits.
    for (int i = tid; i < m * (ROWS / 8); i += WARPS * 32) {
        const int token = i / (ROWS / 8), c = 8 * (i % (ROWS / 8)), row = cta * ROWS + c;
        float sum[8] = {};
#pragma unroll
        for (int v = 0; v < WARPS; ++v) {
            const float4* p = reinterpret_cast<const float4*>(red + (v * MT * 8 + token) * ROWS + c);
            const float4 lo = p[0], hi = p[1];
            sum[0] += lo.x, sum[1] += lo.y, sum[2] += lo.z, sum[3] += lo.w;
            sum[4] += hi.x, sum[5] += hi.y, sum[6] += hi.z, sum[7] += hi.w;
        }
#if HAS_BIAS
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (row + e < n) sum[e] += __uint_as_float(unsigned(bias[row + e]) << 16);
#endif
#if HAS_LORA  // rounded as the unfused layers round: the base output, then the sum with the delta
#pragma unroll
        for (int e = 0; e < 8; ++e) sum[e] = bf16_round(sum[e]);
        const uint4* b = reinterpret_cast<const uint4*>(btile + size_t(token) * rank * ROWS + c);
        for (int r = 0, rank_t = rank_s[token]; r < rank_t; ++r) {
            const uint4 w = b[r * (ROWS / 8)];  // outputs c..c+7 of rank r: bf16 pairs, the lower one first
            const float s = shrunk[token][r];
            sum[0] += __uint_as_float(w.x << 16) * s, sum[1] += __uint_as_float(w.x & 0xFFFF0000u) * s;
            sum[2] += __uint_as_float(w.y << 16) * s, sum[3] += __uint_as_float(w.y & 0xFFFF0000u) * s;
            sum[4] += __uint_as_float(w.z << 16) * s, sum[5] += __uint_as_float(w.z & 0xFFFF0000u) * s;
            sum[6] += __uint_as_float(w.w << 16) * s, sum[7] += __uint_as_float(w.w & 0xFFFF0000u) * s;
        }
#endif
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (row + e < n) {
#if HAS_RESIDUAL  // the residual add after the layer, on its rounded output
                sum[e] = bf16_round(sum[e]) + __uint_as_float(unsigned(residual[size_t(token) * ldr + row + e]) << 16);
#endif
                unsigned short y;
                asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(y) : "f"(sum[e]));
                out[size_t(token) * ldo + col0 + row + e] = y;
            }
    }
#else  // B rows not 16-byte aligned (or too many for shared memory): read from global memory, an output a thread
    for (int i = tid; i < m * ROWS; i += WARPS * 32) {
        const int token = i / ROWS, row = cta * ROWS + i % ROWS;
        float sum = 0.0f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += red[v * MT * 8 * ROWS + i];
        if (row < n) {
#if HAS_BIAS
            sum += __uint_as_float(unsigned(bias[row]) << 16);
#endif
            sum = bf16_round(sum);  // rounded as the unfused layers round: the base output, then the sum with the delta
            const unsigned short* b = lora_b + size_t(slot_s[token]) * stride_bs + col0 + row;
            for (int r = 0, rank_t = rank_s[token]; r < rank_t; ++r)
                sum += __uint_as_float(unsigned(b[size_t(r) * stride_br]) << 16) * shrunk[token][r];
#if HAS_RESIDUAL  // the residual add after the layer, on its rounded output
            sum = bf16_round(sum) + __uint_as_float(unsigned(residual[size_t(token) * ldr + row]) << 16);
#endif
            unsigned short y;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(y) : "f"(sum));
            out[size_t(token) * ldo + col0 + row] = y;
        }
    }
#endif
}
