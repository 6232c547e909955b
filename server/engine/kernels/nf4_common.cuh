// The parts both NF4 tensor-core kernels (nf4_mma.cu, nf4_wide.cu) share: the weight a CTA reads among a launch's
// segments, the weights' copies into shared memory, their scales, the decode table in shared memory and the
// m16n8k16 product. The includer defines NESTED, GROUP, SEGMENTS and NF4_CODES (bitsandbytes' code book as bf16 bits).
//
// The decode table: 256 entries, one a code byte, each the bf16 pair of its two codes, stored once per lane (entry
// e of lane l at byte LUT_ENTRY e + 4 l: every lane reads its own bank, no conflicts).

__constant__ unsigned short NF4_BF16[16] = {NF4_CODES};

// Bytes from one entry of the table to the next: 128 (the lanes' words back to back), or 256 where the includer
// defines it so (64 KB of table, half of it unused), so that one byte permute makes a lookup's address
#ifndef LUT_ENTRY
#define LUT_ENTRY 128
#endif
#define LUT_WORDS (256 * LUT_ENTRY / 4)

// One NF4 weight of a launch: its codes, scales (absmax, and under double quantization its second level, code2 and
// offset), bias and output rows.
struct Segment {
    const unsigned char* w;
    const void* absmax;
    const float* absmax2;
    const float* code2;
    const float* offset;
    const unsigned short* bias;
    int n;
};

// Weights that share x (q/k/v, gate/up) in one launch: each is a segment of the output columns, its CTAs after the
// previous segments'. The CTA's weight is chosen among kernel parameters: no memory read before the weights'. Turns
// `cta` into the CTA's tile in its segment, `col0` into the segment's first output column and `s` (segment 0's on
// entry) into the segment's weight; returns the segment's index.
__device__ __forceinline__ int select_segment(int& cta, int& col0, Segment& s, const Segment& s1, const Segment& s2,
                                              int end_0, int end_1) {
    if (SEGMENTS == 1 || cta < end_0) return 0;
    const bool second = SEGMENTS == 2 || cta < end_1;
    col0 = second ? s.n : s.n + s1.n;
    cta -= second ? end_0 : end_1;
    s = second ? s1 : s2;
    return second ? 1 : 2;
}

__device__ __forceinline__ void write_lut(unsigned* lut, int tid, int threads) {
    // 16-byte stores, a warp writing four whole entries (512 contiguous bytes, no bank conflicts)
    for (int q = tid; q < 256 * 8; q += threads) {
        const int e = q >> 3;
        const unsigned pair = NF4_BF16[e >> 4] | (unsigned(NF4_BF16[e & 15]) << 16);
        reinterpret_cast<uint4*>(lut)[e * (LUT_ENTRY / 16) + (q & 7)] = make_uint4(pair, pair, pair, pair);
    }
}

// A 16-byte copy into shared memory (dst: a shared address) of which `bytes` are read, the rest zero-filled,
// bypassing L1 (weights are read once a step: they must not evict x and the scales); L2 fetches the PREFETCH
// bytes (128 or 256) around it from DRAM at once, as the next copies of a row or step will want them.
template <int PREFETCH>
__device__ __forceinline__ void copy16(unsigned dst, const void* src, int bytes) {
    if constexpr (PREFETCH == 256)
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
    else
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}

// A row's absmax for the GROUP blocks a warp takes at once, loaded a group ahead and turned into floats only
// when used: under double quantization an absmax is an index into code2, and looking it up where it is loaded
// would stall the warp for a memory round trip before it could issue the next group's weight loads.
struct Scales {
#if NESTED
    unsigned codes;  // GROUP bytes, indices into code2 (a group never crosses a 256-block boundary: see the host)
    float absmax2;   // the second-level scale of the group's 256 blocks
#else
    float absmax[GROUP];
#endif
};

__device__ __forceinline__ Scales load_scales(const void* absmax, const float* absmax2, unsigned block) {
    Scales s;
#if NESTED
    const unsigned char* p = static_cast<const unsigned char*>(absmax) + block;  // block: a multiple of GROUP
#if GROUP == 4
    s.codes = __ldg(reinterpret_cast<const unsigned*>(p));
#elif GROUP == 2
    s.codes = __ldg(reinterpret_cast<const unsigned short*>(p));
#else
    s.codes = __ldg(p);
#endif
    s.absmax2 = __ldg(absmax2 + (block >> 8));
#else
#pragma unroll
    for (int i = 0; i < GROUP; ++i) s.absmax[i] = __ldg(static_cast<const float*>(absmax) + block + i);
#endif
    return s;
}

__device__ __forceinline__ float scale_of(const Scales& s, int i, const float* code2, float offset) {
#if NESTED
    return code2[(s.codes >> (8 * i)) & 0xFFu] * s.absmax2 + offset;
#else
    return s.absmax[i];
#endif
}

__device__ __forceinline__ unsigned pair_of(const unsigned* lut, unsigned lane4, unsigned word, int byte) {
#if LUT_ENTRY == 256
    // the bf16 pair of byte `byte` of `word`: byte offset 256 e + 4 lane of the table, e placed above lane4's byte
    // by one permute (lane4's bytes 1..3 are zero)
    const unsigned offset = __byte_perm(word, lane4, 0x5504 | (byte << 4));
#else
    // the bf16 pair of byte `byte` of `word`: byte offset 128 e + 4 lane of the table (one OR: disjoint bits)
    const unsigned offset = lane4 | ((byte == 0 ? word << 7 : word >> (8 * byte - 7)) & 0x7F80u);
#endif
    return *reinterpret_cast<const unsigned*>(reinterpret_cast<const char*>(lut) + offset);
}

__device__ __forceinline__ float bf16_round(float v) {  // to bf16 and back: the rounding an unfused layer does
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return __uint_as_float(unsigned(h) << 16);
}

__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Launched as a programmatic dependent (pdl.py), the kernel may start while the kernel before it runs: it reads
// what a step writes (x, the shrink's sums, slots and ranks, B, the residual) and writes anything only after this
// wait, which returns once that kernel has ended and its writes are visible (at once for a plain launch). Every
// thread passes it before exiting, so this kernel ends only after the one before it. Past it, the kernel after this
// one may start.
__device__ __forceinline__ void wait_for_inputs() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
