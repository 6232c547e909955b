// y [m, n] = x [m, k] @ dequant(W [n, k]).T (+ bias) for 1-64 rows of x on the tensor cores (sm_80+), W in
// bitsandbytes' NF4 layout as stored: two codes a byte (the even column in the high nibble), one absmax a 64
// weights (8-bit quantized per 256 blocks under double quantization).
//
// Why not a table in registers (the Triton kernels): each lane decodes a byte of two codes into the bf16 pair a
// tensor-core operand register holds with one shared-memory load from a 256-entry table of pairs, stored once
// per lane (entry e of lane l at byte LUT_ENTRY e + 4 l, so every lane reads its own bank: no conflicts). A weight
// costs ~1.5 instructions (shift, mask, load per two) with entries 128 bytes apart, ~1 (a byte permute and a load
// per two) with 256 (a 64 KB table), under the ~3.5 a weight the H100/H200 can issue at full memory bandwidth;
// the multiply-adds are the tensor cores'. The table is in dynamic shared memory, its entries' spacing the
// host's choice: the larger table leaves L1 less room for x, which costs more once x has several rows.
//
// The reduction order of an mma is free, so a lane's k indices are chosen to match the bytes it loads: lane
// (g = lane / 4, t = lane % 4) loads bytes 8t..8t+7 of a 32-byte block row (64 weights) for rows g and g+8 of a
// 16-row tile; step s of the block's four m16n8k16 products takes its bytes 2s and 2s+1, i.e. columns
// 16t+4s..16t+4s+3, and the same four columns of x are its B operand (one 8-byte load). A block's four steps
// sum into a fresh accumulator, scaled by the two rows' absmax into the running one.
//
// A CTA owns a tile of NT 16-row tiles of output rows at a time: its WARPS warps split K (each an equal share of
// its GROUP-block groups, give or take one) and store their partial sums in shared memory at the tile's end, where
// the CTA's threads (PHASED: one warp in turn, while the others go on to the next tile) add them, the bias and each
// row's LoRA delta (the expand half of the LoRA kernels: the shrink's partial sums @ B of the row's slot). CTAs are
// persistent: as many as fit the SMs at once, each taking tiles blockIdx.x, blockIdx.x + gridDim.x, ... (one CTA a
// tile where there are fewer tiles), so that the decode table is written once a CTA and no wave of CTAs waits for
// the last one's tail.
//
// Why the weights go through shared memory: a warp copies its groups there with cp.async, STAGES - 1 groups ahead
// of the one it multiplies, across its tiles' boundaries (the next tile's first groups stream while this one's
// partial sums are added). In-flight loads then hold no registers, where holding them in registers capped the
// loads in flight, and the copies of the next groups are in flight while a warp waits at a tile's barriers
// (BENCHMARKS.md). The first STAGES - 1 groups are requested before the kernel waits for the one before it (PDL).
// Each lane then reads its 8 bytes of a block row from the stage, as it read them from global memory before.
//
// Defined by the host: WARPS, GROUP, NT, MT (n8 tiles of x rows: ceil(m / 8)), STAGES, MIN_BLOCKS (CTAs an SM
// must fit by registers), LUT_ENTRY, NESTED, HAS_BIAS, HAS_LORA, R_PAD, BTILE, SEGMENTS (weights of one launch, up
// to 3), HAS_RESIDUAL (a tensor added to the rounded output, as a decoder layer's residual add does), PHASED (tile
// ends without a barrier) and NF4_CODES (bitsandbytes' code book as bf16 bits).

#define ROWS (16 * NT)
// A staged row of a group: its GROUP 32-byte blocks. The 8-byte reads of a half warp (four consecutive rows, 32
// contiguous bytes of each) must fall in distinct banks. Groups of 4 blocks (128-byte rows) swizzle: block i of row
// r is stored at 32 (i ^ r % 4) of the row, so that a quarter warp's 16-byte copies still write one whole row, one
// wavefront (rows padded to 160 bytes took seven a copy instead of four: 17% of the L1 data pipe's wavefronts at one
// row of x). Groups of 2 blocks pad each row with 32 bytes instead (rows 32 bytes apart modulo 128).
#define WROW (GROUP == 1 ? 32 : GROUP == 4 ? 128 : 32 * GROUP + 32)
#define SWIZZLE(row) (GROUP == 4 ? (row) & 3 : 0)
#define STAGE_BYTES (ROWS * WROW)
#define LUT_BYTES (LUT_WORDS * 4)
#define RING_BYTES (WARPS * STAGES * STAGE_BYTES)
// The warps' partial sums, an x row's ROWS outputs 4 floats apart from the next row's: a warp's C fragments (rows
// g, g + 8 x x rows 2t, 2t + 1) then store to 32 distinct banks (4-way conflicts where rows were back to back)
#define RED_ROW (ROWS + 4)
#define RED_BYTES (WARPS * MT * 8 * RED_ROW * 4)

// Wait until at most `newer` of this thread's most recent cp.async groups are pending (all older ones complete).
__device__ __forceinline__ void wait_copies(int newer) {
    switch (newer) {
        case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
        case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
        case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
        case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    }
}

// A barrier object in shared memory (sm_80+): a phase completes once `count` threads have arrived; a thread waits
// for the phase of a parity without arriving, so that warps wait only for what they read.
__device__ __forceinline__ void phase_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(unsigned(__cvta_generic_to_shared(bar))), "r"(count));
}
__device__ __forceinline__ void phase_arrive(unsigned long long* bar) {  // with release: this thread's writes
    asm volatile("{ .reg .b64 state; mbarrier.arrive.shared.b64 state, [%0]; }"
                 ::"r"(unsigned(__cvta_generic_to_shared(bar))) : "memory");
}
// sm_90's try_wait suspends the warp a while where the phase is not complete; sm_80's test_wait only tests
#if __CUDA_ARCH__ >= 900
#define PHASE_TEST "mbarrier.try_wait.parity.shared.b64"
#else
#define PHASE_TEST "mbarrier.test_wait.parity.shared.b64"
#endif
__device__ __forceinline__ void phase_wait(unsigned long long* bar, unsigned parity) {  // with acquire
    unsigned done;
    do {
        asm volatile("{ .reg .pred p; " PHASE_TEST " p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(unsigned(__cvta_generic_to_shared(bar))), "r"(parity) : "memory");
    } while (!done);
}

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
    // tiles before segment 1's and segment 2's
    const unsigned char* __restrict__ w_1, const void* __restrict__ absmax_1, const float* __restrict__ absmax2_1,
    const float* __restrict__ code2_1, const float* __restrict__ offset_1, const unsigned short* __restrict__ bias_1,
    int n_1,
    const unsigned char* __restrict__ w_2, const void* __restrict__ absmax_2, const float* __restrict__ absmax2_2,
    const float* __restrict__ code2_2, const float* __restrict__ offset_2, const unsigned short* __restrict__ bias_2,
    int n_2, int end_0, int end_1,
    const unsigned short* __restrict__ residual,  // [m, ldr] bf16 (HAS_RESIDUAL; one segment)
    int ldr,
    int tiles,                               // the launch's tiles of ROWS output rows, all segments
    // the next launch's first weight bytes and scales, asked of L2 as this launch's copies end (none: 0 bytes)
    const unsigned char* __restrict__ ahead, long long ahead_bytes,
    const unsigned char* __restrict__ ahead_scales, long long ahead_scales_bytes) {
    __shared__ float code2_s[NESTED ? SEGMENTS * 256 : 1];  // each segment's
#if PHASED
    // The tile's end without a barrier (where a CTA has several tiles): each warp stores its partial sums and arrives
    // at `summed`; one warp (tile q of the CTA: warp q % WARPS) waits there, runs the tile's epilogue and arrives at
    // `read[q % 2]`. A warp waits for the epilogue of tile q - 1 before it stores tile q's sums, and (BTILE) for tile
    // q - 2's before it copies tile q's B rows into their buffer. The other warps go on with the next tile's
    // weights. Where a CTA has one or two tiles, the barrier is faster: the last epilogue's warp would wait on a
    // phase for the others (BENCHMARKS.md).
    __shared__ unsigned long long summed, read[2];
#define EPILOGUE_THREAD lane
#define EPILOGUE_THREADS 32
#else
#define EPILOGUE_THREAD tid
#define EPILOGUE_THREADS (WARPS * 32)
#endif
    // the decode table, the warps' staged weights [WARPS][STAGES][ROWS][WROW], their partial sums [WARPS][x row]
    // [RED_ROW: output row of the tile] fp32, then (BTILE) two tiles' B rows [2][m][rank][ROWS] bf16 (the host
    // sizes it)
    extern __shared__ __align__(16) unsigned char dynamic[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    unsigned* lut = reinterpret_cast<unsigned*>(dynamic);
    float* red = reinterpret_cast<float*>(dynamic + LUT_BYTES + RING_BYTES);
#if HAS_LORA
    __shared__ float shrunk[MT * 8 * R_PAD];  // [x row][R_PAD]
    __shared__ long long slot_s[MT * 8];
    __shared__ int rank_s[MT * 8];
#endif
#if BTILE
    unsigned short* btiles = reinterpret_cast<unsigned short*>(dynamic + LUT_BYTES + RING_BYTES + RED_BYTES);
#endif
    const Segment segment0{w, absmax, absmax2, code2, offset_ptr, bias, n};
    const Segment segment1{w_1, absmax_1, absmax2_1, code2_1, offset_1, bias_1, n_1};
    const Segment segment2{w_2, absmax_2, absmax2_2, code2_2, offset_2, bias_2, n_2};
    // This warp's groups of each tile: groups [first, first + per_tile) of K's (the host: at least one a warp)
    const int blocks_k = k >> 6, groups = blocks_k / GROUP;
    const int first = warp * groups / WARPS, per_tile = (warp + 1) * groups / WARPS - first;
    const size_t row_bytes = size_t(blocks_k) * 32;
    unsigned char* ring = dynamic + LUT_BYTES + warp * STAGES * STAGE_BYTES;
    const unsigned ring_s = unsigned(__cvta_generic_to_shared(ring));
    const int unit = blockIdx.x, units = gridDim.x;  // the CTA's tiles: unit, unit + units, ...

    // The segment of launch tile `tile`: its weight, its tile in that weight (`cta`) and the weight's first output
    // column; returns the segment's index
    auto tile_of = [&](int tile, int& cta, int& col0, Segment& s) {
        cta = tile, col0 = 0, s = segment0;
        return select_segment(cta, col0, s, segment1, segment2, end_0, end_1);
    };

    // The copies: a cursor over the CTA's tiles and this warp's groups of each, the next group to copy and its
    // stage. A group's weights go to its stage: ROWS rows of GROUP blocks, 16 bytes a copy (copy u of a lane: row
    // lane / (2 GROUP) + u 16 / GROUP, part lane % (2 GROUP)), a row's copies by consecutive lanes; rows past the
    // weight's last zero-fill (their outputs are not stored). Each lane of the first ROWS also asks L2 for its
    // row's scales of the group, which load_scales reads a group ahead. What stays the same along a tile is set
    // when the cursor enters it.
    constexpr int COPIES = NT * GROUP;  // a lane's copies a group
    int issue_tile = unit, issue_step = 0, issue_stage = 0;
    const unsigned char* issue_src = nullptr;  // the lane's first copy's source, at the cursor's group
    const unsigned char* issue_null = nullptr; // a source inside the weight for the copies of nothing
    const char* issue_scales = nullptr;         // the scales the lane prefetches, at the cursor's group
    unsigned issue_valid = 0;                    // bit u: copy u's row is one of the weight's
    auto enter = [&]() {
        if (issue_tile >= tiles) return;
        int cta, col0;
        Segment s;
        tile_of(issue_tile, cta, col0, s);
        const int row = cta * ROWS + lane / (2 * GROUP);
        issue_src = s.w + size_t(row) * row_bytes + first * GROUP * 32 + lane % (2 * GROUP) * 16;
        issue_null = s.w;
        issue_valid = 0;
#pragma unroll
        for (int u = 0; u < COPIES; ++u) issue_valid |= unsigned(row + u * 16 / GROUP < s.n) << u;
        const unsigned block = unsigned(min(cta * ROWS + lane % ROWS, s.n - 1)) * blocks_k + first * GROUP;
        issue_scales = static_cast<const char*>(s.absmax) + size_t(block) * (NESTED ? 1 : 4);
    };
    auto issue = [&]() {
        if (issue_tile < tiles) {
            const unsigned part = lane % (2 * GROUP), row = lane / (2 * GROUP);  // copy 0's (rows + 16 u / GROUP)
            const unsigned stage = ring_s + issue_stage * STAGE_BYTES + row * WROW +
                                   ((part >> 1 ^ SWIZZLE(row)) << 5 | (part & 1) << 4);
#pragma unroll
            for (int u = 0; u < COPIES; ++u) {
                const bool valid = issue_valid >> u & 1;
                const unsigned char* src = valid ? issue_src + u * 16 / GROUP * row_bytes : issue_null;
                copy16<128>(stage + u * 16 / GROUP * WROW, src, valid ? 16 : 0);
            }
            if (lane < ROWS) asm volatile("prefetch.global.L2 [%0];" ::"l"(issue_scales));
            issue_src += GROUP * 32, issue_scales += GROUP * (NESTED ? 1 : 4);
            issue_stage = issue_stage + 1 == STAGES ? 0 : issue_stage + 1;
            if (++issue_step == per_tile) issue_step = 0, issue_tile += units, enter();
        }
        asm volatile("cp.async.commit_group;");
    };

    // The scales of the lane's rows (g, g + 8 of each 16-row tile): their first block of a tile (this warp's first
    // group), set for a tile by `rows_of`
    auto rows_of = [&](int cta, const Segment& s, unsigned (&blocks)[NT][2]) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                blocks[nt][h] = unsigned(min(cta * ROWS + 16 * nt + 8 * h + g, s.n - 1)) * blocks_k + first * GROUP;
    };
    auto group_scales = [&](const Segment& s, const unsigned (&blocks)[NT][2], int step, Scales (&sc)[NT][2]) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) sc[nt][h] = load_scales(s.absmax, s.absmax2, blocks[nt][h] + step * GROUP);
    };

    int cta, col0, index;  // the tile in hand's, in its segment
    Segment s;
    unsigned blocks[NT][2];
    Scales scales[NT][2];
    index = tile_of(unit, cta, col0, s);  // the host launches no more CTAs than tiles
    rows_of(cta, s, blocks);
    group_scales(s, blocks, 0, scales);
    enter();
    for (int q = 0; q < STAGES - 1; ++q) issue();  // in flight while the tables are written
#if NESTED
    for (int i = tid; i < SEGMENTS * 256; i += WARPS * 32)
        code2_s[i] = (i < 256 ? segment0 : i < 512 ? segment1 : segment2).code2[i & 255];
    const float offsets[3] = {*segment0.offset, *segment1.offset, *segment2.offset};
#else
    const float offset = 0.0f;
#endif
    write_lut(lut, tid, WARPS * 32);
    wait_for_inputs();  // the weights' first groups are in flight, the table written: now the step's own inputs
#if HAS_LORA
    for (int token = tid; token < m; token += WARPS * 32) slot_s[token] = slots[token], rank_s[token] = ranks[token];
#endif
#if PHASED
    if (tid == 0) phase_init(&summed, WARPS * 32), phase_init(&read[0], 32), phase_init(&read[1], 32);
#endif
    __syncthreads();
#if HAS_LORA
    // Each x row's shrunk activations for the segment of the tile in hand, rounded to bf16 as the unfused x @ A.T
    // leaves them: summed once a segment (the first before the main loop, their loads beside the weights' first
    // groups, the next at the first tile of the next segment, once the epilogues before it are done).
    int shrunk_segment;
    auto sum_shrunk = [&](int segment) {
        const float* p0 = partial + segment * partial_stride;
        for (int i = tid; i < m * R_PAD; i += WARPS * 32) {
            if (i % R_PAD >= rank_s[i / R_PAD]) continue;  // past the row's rank: not read below
            const float* p = p0 + size_t(i / R_PAD) * chunks_pad * R_PAD + i % R_PAD;
            float sum = 0.0f;
#pragma unroll 16
            for (int c = 0; c < chunks; ++c) sum += p[c * R_PAD];  // 16 loads in flight: down's K has 56 chunks
            shrunk[i] = bf16_round(sum);
        }
        shrunk_segment = segment;
    };
    sum_shrunk(index);
#endif
    const unsigned lane4 = 4 * lane;

    // x rows of this lane's B operands: row 8 j + g of x, columns from the warp's first block + 16 t. A lane past
    // the last row reads row 0 (unpredicated loads, nothing zeroed each block): an mma keeps its B columns apart,
    // so that lane's products land in output columns of no row, never stored.
    const unsigned short* xs[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) xs[j] = x + size_t(8 * j + g < m ? 8 * j + g : 0) * ldx + first * GROUP * 64 + 16 * t;

    int stage_in_use = 0;  // the stage of the group in hand
    for (int tile = unit, q = 0; tile < tiles; tile += units, ++q) {  // the CTA's tile q
#if BTILE || PHASED
        const int parity = q & 1;  // the tile's buffer of B rows and the barrier its epilogue arrives at
#endif
#if HAS_LORA
        if (index != shrunk_segment) {  // the same for the whole CTA; each epilogue before here is done with them
            __syncthreads();
            sum_shrunk(index);
            __syncthreads();
        }
#endif
#if BTILE && PHASED
        if (q >= 2) phase_wait(&read[parity], (q - 2) >> 1 & 1);  // tile q - 2's epilogue is done with the buffer
#endif
#if BTILE
        // The epilogue's B rows for this tile, copied into shared memory (the buffer of the tile's parity: the last
        // tile's epilogue may still read the other) with the group of weights issued next: read from global memory
        // in the epilogue, they ended every tile on a chain of round trips (3% of a decode step at batch 1, 1% at
        // 32 on the H200). 16 bytes a copy; those past the last output row copy nothing and zero-fill; rows past
        // the x row's rank are not copied (nor read).
        unsigned short* btile = btiles + parity * m * rank * ROWS;
        for (int c = tid; c < m * rank * (ROWS / 8); c += WARPS * 32) {
            const int token = c / (rank * (ROWS / 8)), r = c / (ROWS / 8) % rank;
            const int col = cta * ROWS + 8 * (c % (ROWS / 8));
            if (r >= rank_s[token]) continue;
            const int bytes = max(0, min(16, 2 * (s.n - col)));
            const unsigned short* src =  // a copy of nothing still names an address inside the row: the tile's first
                lora_b + size_t(slot_s[token]) * stride_bs + size_t(r) * stride_br + col0 + (bytes ? col : cta * ROWS);
            copy16<128>(unsigned(__cvta_generic_to_shared(btile + 8 * c)), src, bytes);
        }
#endif
#if NESTED
        const float* code2_t = code2_s + index * 256;  // the tile's weight's second level
        const float offset = index == 0 ? offsets[0] : index == 1 ? offsets[1] : offsets[2];
#else
        const float* code2_t = code2_s;
#endif
        float acc[MT][NT][4];
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < NT; ++i) acc[j][i][0] = acc[j][i][1] = acc[j][i][2] = acc[j][i][3] = 0.0f;
        int next_cta = cta, next_col0 = col0, next_index = index;  // the next tile's
        Segment next_s = s;
        unsigned next_blocks[NT][2];
        for (int step = 0; step < per_tile; ++step) {
            issue();
            Scales next_scales[NT][2];  // the next group's: this tile's next, or the next tile's first
            if (step + 1 < per_tile) {
                group_scales(s, blocks, step + 1, next_scales);
            } else if (tile + units < tiles) {
                next_index = tile_of(tile + units, next_cta, next_col0, next_s);
                rows_of(next_cta, next_s, next_blocks);
                group_scales(next_s, next_blocks, 0, next_scales);
            }
            asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1) : "memory");
            __syncwarp();  // the other lanes' copies of the stage are visible
            const unsigned char* stage = ring + stage_in_use * STAGE_BYTES;
            const int kb = step * GROUP;  // x's block of the group, from the warp's first
#pragma unroll
            for (int i = 0; i < GROUP; ++i) {
                unsigned a[NT][4][4];  // [tile][step][A register]: rows g, g+8 x columns 16t+4s+{0,1}, then +{2,3}
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const unsigned char* rows = stage + (16 * nt + g) * WROW + 32 * (i ^ SWIZZLE(g)) + 8 * t;  // g, g+8
                    const uint2 word0 = *reinterpret_cast<const uint2*>(rows);
                    const uint2 word1 = *reinterpret_cast<const uint2*>(rows + 8 * WROW);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const unsigned w0 = e < 2 ? word0.x : word0.y, w1 = e < 2 ? word1.x : word1.y;
                        a[nt][e][0] = pair_of(lut, lane4, w0, 2 * (e & 1));
                        a[nt][e][1] = pair_of(lut, lane4, w1, 2 * (e & 1));
                        a[nt][e][2] = pair_of(lut, lane4, w0, 2 * (e & 1) + 1);
                        a[nt][e][3] = pair_of(lut, lane4, w1, 2 * (e & 1) + 1);
                    }
                }
#pragma unroll
                for (int j = 0; j < MT; ++j) {
                    const uint4* p = reinterpret_cast<const uint4*>(xs[j] + (kb + i) * 64);
                    const uint4 lo = p[0], hi = p[1];  // x columns 16t..16t+7, 16t+8..16t+15 of this block
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const float s0 = scale_of(scales[nt][0], i, code2_t, offset);
                        const float s1 = scale_of(scales[nt][1], i, code2_t, offset);
                        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        mma(part, a[nt][0], lo.x, lo.y);
                        mma(part, a[nt][1], lo.z, lo.w);
                        mma(part, a[nt][2], hi.x, hi.y);
                        mma(part, a[nt][3], hi.z, hi.w);
                        acc[j][nt][0] += part[0] * s0;
                        acc[j][nt][1] += part[1] * s0;
                        acc[j][nt][2] += part[2] * s1;
                        acc[j][nt][3] += part[3] * s1;
                    }
                }
            }
            __syncwarp();  // every lane is done with the stage before the next copies refill it
            stage_in_use = stage_in_use + 1 == STAGES ? 0 : stage_in_use + 1;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) scales[nt][0] = next_scales[nt][0], scales[nt][1] = next_scales[nt][1];
        }

        // The tile's end: the warps' partial sums added, then the epilogue
#if PHASED
        if (q >= 1) phase_wait(&read[parity ^ 1], (q - 1) >> 1 & 1);  // tile q - 1's epilogue is done with the sums
#else
        __syncthreads();  // the last tile's epilogue is done with the sums
#endif
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {  // C fragment: rows g, g+8 x x rows 8 j + 2t, 8 j + 2t + 1
                float* base = red + (warp * MT * 8 + 8 * j + 2 * t) * RED_ROW + 16 * nt + g;
                base[0] = acc[j][nt][0];
                base[RED_ROW] = acc[j][nt][1];
                base[8] = acc[j][nt][2];
                base[RED_ROW + 8] = acc[j][nt][3];
            }
#if BTILE
        // this tile's B rows were copied with the first group issued in its loop: of the groups issued since, at
        // most per_tile - 1 may still be in flight once theirs is done
        if (per_tile < STAGES) wait_copies(per_tile - 1);
#endif
#if PHASED
        phase_arrive(&summed);
        if (warp == q % WARPS) {  // the tile's epilogue
            phase_wait(&summed, q & 1);
#else
        __syncthreads();
        {  // the tile's epilogue
#endif
            const int n = s.n;
#if HAS_BIAS
            const unsigned short* bias = s.bias;
#endif
#if BTILE || !HAS_LORA
            // Eight consecutive outputs of one x row a thread: the warps' partial sums and the B tile read 16 bytes at
            // a time, each shrunk activation once for the eight (one output a thread read them 4 bytes and 2 bytes at
            // a time, and the loop over the rank was most of the epilogue's instructions at 32 rows). Each output's
            // sums are made in the same order as before: the same bits.
            for (int i = EPILOGUE_THREAD; i < m * (ROWS / 8); i += EPILOGUE_THREADS) {
                const int token = i / (ROWS / 8), c = 8 * (i % (ROWS / 8)), row = cta * ROWS + c;
                float sum[8] = {};
#pragma unroll
                for (int v = 0; v < WARPS; ++v) {
                    const float4* p = reinterpret_cast<const float4*>(red + (v * MT * 8 + token) * RED_ROW + c);
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
                    const float s = shrunk[token * R_PAD + r];
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
                        sum[e] = bf16_round(sum[e]) +
                                 __uint_as_float(unsigned(residual[size_t(token) * ldr + row + e]) << 16);
#endif
                        unsigned short y;
                        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(y) : "f"(sum[e]));
                        out[size_t(token) * ldo + col0 + row + e] = y;
                    }
            }
#else  // B rows not 16-byte aligned (or too many for shared memory): read from global memory, an output a thread
            for (int i = EPILOGUE_THREAD; i < m * ROWS; i += EPILOGUE_THREADS) {
                const int token = i / ROWS, row = cta * ROWS + i % ROWS;
                float sum = 0.0f;
#pragma unroll
                for (int v = 0; v < WARPS; ++v) sum += red[(v * MT * 8 + token) * RED_ROW + i % ROWS];
                if (row < n) {
#if HAS_BIAS
                    sum += __uint_as_float(unsigned(bias[row]) << 16);
#endif
                    // rounded as the unfused layers round: the base output, then the sum with the delta
                    sum = bf16_round(sum);
                    const unsigned short* b = lora_b + size_t(slot_s[token]) * stride_bs + col0 + row;
                    for (int r = 0, rank_t = rank_s[token]; r < rank_t; ++r)
                        sum += __uint_as_float(unsigned(b[size_t(r) * stride_br]) << 16) * shrunk[token * R_PAD + r];
#if HAS_RESIDUAL  // the residual add after the layer, on its rounded output
                    sum = bf16_round(sum) + __uint_as_float(unsigned(residual[size_t(token) * ldr + row]) << 16);
#endif
                    unsigned short y;
                    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(y) : "f"(sum));
                    out[size_t(token) * ldo + col0 + row] = y;
                }
            }
#endif
#if PHASED
            phase_arrive(&read[parity]);
#endif
        }
        cta = next_cta, col0 = next_col0, index = next_index, s = next_s;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) blocks[nt][0] = next_blocks[nt][0], blocks[nt][1] = next_blocks[nt][1];
    }
    // The warp's share of the next launch's first bytes (lane 0) and of their scales (lane 1), asked of L2 as it
    // leaves (sm_90's bulk prefetch; none before): DRAM would otherwise idle through this launch's tail, the kernels
    // between the two and the next one's first round trip. 4 MB of each weight (AHEAD_BYTES) gained most.
#if __CUDA_ARCH__ >= 900
    if (lane < 2) {
        const unsigned long long bytes = ((lane ? ahead_scales_bytes : ahead_bytes) + 15) & ~15ull;
        const unsigned long long all = gridDim.x * WARPS, me = blockIdx.x * WARPS + warp, lines = (bytes + 127) >> 7;
        const unsigned long long begin = (me * lines / all) << 7, end = min(((me + 1) * lines / all) << 7, bytes);
        if (end > begin)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
                         ::"l"((lane ? ahead_scales : ahead) + begin), "r"(unsigned(end - begin)) : "memory");
    }
#endif
}
