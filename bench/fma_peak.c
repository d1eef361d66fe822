/* Physical FLOP peak of this CPU: chains of independent FMAs on every thread (bench/peak.py builds and runs it).
 *
 *   gcc -O2 -march=native -pthread fma_peak.c -o fma_peak && ./fma_peak THREADS [SECONDS]
 *
 * Each thread runs CHAINS independent accumulator chains (more than FMA latency x FMA ports, so the FMA units
 * never wait) for a calibrated number of iterations; the rate is all threads' flops over the wall time from the
 * first thread's start to the last one's end (not the slowest thread's own time: threads that ran one after the
 * other on a shared core would count as parallel), best of REPEATS runs; each figure is measured on 1 thread and
 * on THREADS threads. fp32: AVX-512 (16 lanes) when the compiler targets it, else AVX2 + FMA (8 lanes);
 * 2 flops per lane per FMA. bf16: vdpbf16ps (AVX512_BF16) when targeted: 16 lanes x 2 products = 64 flops per
 * instruction. AMX (amx_bf16 tiles) when targeted and the kernel grants tile data (arch_prctl): TDPBF16PS into four
 * independent 16x16 fp32 accumulator tiles from two A and two B tiles (all eight tiles), 2 x 16 x 16 x 32 = 16 384
 * flops per instruction. Prints one JSON object on stdout.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REPEATS 5

#if defined(__AVX512F__)
#define ISA "avx512"
#define LANES 16
#define CHAINS 24
typedef __m512 vec;
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSET1(x) _mm512_set1_ps(x)
#define VADD(a, b) _mm512_add_ps(a, b)
static float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA "avx2"
#define LANES 8
#define CHAINS 12
typedef __m256 vec;
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSET1(x) _mm256_set1_ps(x)
#define VADD(a, b) _mm256_add_ps(a, b)
static float vsum(vec v) {
    float out[8];
    _mm256_storeu_ps(out, v);
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}
#else
#error "needs AVX2 + FMA or AVX-512 (compile with -march=native on such a CPU)"
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* CHAINS independent accumulator chains acc[j] = STEP(acc[j]), then their sum (so nothing is optimised away). */
#define CHAIN_LOOP(acc, STEP)                                              \
    for (long i = 0; i < iterations; i++) {                                \
        _Pragma("GCC unroll 32") for (int j = 0; j < CHAINS; j++) acc[j] = STEP(acc[j]); \
    }

/* a = a * b + c; b < 1 keeps every value finite and normal (no denormal stalls). */
static float fp32_kernel(long iterations, float seed) {
    vec acc[CHAINS];
    const vec b = VSET1(0.999999f), c = VSET1(1e-6f);
    for (int j = 0; j < CHAINS; j++) acc[j] = VSET1(seed + 0.001f * j);
#define FP32_STEP(x) VFMA(x, b, c)
    CHAIN_LOOP(acc, FP32_STEP)
    vec total = acc[0];
    for (int j = 1; j < CHAINS; j++) total = VADD(total, acc[j]);
    return vsum(total);
}

#if defined(__AVX512BF16__)
#define HAS_BF16 1
/* acc += a . b over bf16 pairs (vdpbf16ps); the fp32 accumulators grow by 2e-6 a step. */
static float bf16_kernel(long iterations, float seed) {
    __m512 acc[CHAINS];
    const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
    for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_set1_ps(seed + 0.001f * j);
#define BF16_STEP(x) _mm512_dpbf16_ps(x, a, a)
    CHAIN_LOOP(acc, BF16_STEP)
    __m512 total = acc[0];
    for (int j = 1; j < CHAINS; j++) total = _mm512_add_ps(total, acc[j]);
    return _mm512_reduce_add_ps(total);
}
#else
#define HAS_BF16 0
#endif


#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define HAS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_FLOPS (2.0 * 16 * 16 * 32)
#define AMX_STEPS 4

/* Linux hands out AMX tile state only on request (once, for the whole process). */
static int amx_granted(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} tile_config;

/* C[i][j] += A[i] . B[j] on tiles 0-3 (fp32) from A tiles 4-5 and B tiles 6-7 (bf16 pairs); each thread configures
 * its own tiles. The inputs are small (bf16 0x3A83 ~ 1e-3), so the accumulators stay finite. */
static float amx_kernel(long iterations, float seed) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
    static __thread unsigned short inputs[16 * 32];
    static __thread float accumulators[16 * 16];
    for (int i = 0; i < 16 * 32; i++) inputs[i] = 0x3A83;
    for (int i = 0; i < 16 * 16; i++) accumulators[i] = seed;
    _tile_loadd(0, accumulators, 64);
    _tile_loadd(1, accumulators, 64);
    _tile_loadd(2, accumulators, 64);
    _tile_loadd(3, accumulators, 64);
    _tile_loadd(4, inputs, 64);
    _tile_loadd(5, inputs, 64);
    _tile_loadd(6, inputs, 64);
    _tile_loadd(7, inputs, 64);
    for (long i = 0; i < iterations; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    float total = 0.0f;
    _tile_stored(0, accumulators, 64);
    total += accumulators[0];
    _tile_stored(3, accumulators, 64);
    total += accumulators[255];
    _tile_release();
    return total;
}
#else
#define HAS_AMX 0
#endif

enum kind { FP32, BF16, AMX };

typedef struct {
    enum kind kind;
    long iterations;
    pthread_barrier_t *barrier;
    double started, ended;
    float sink;
} job;

static void *worker(void *arg) {
    job *w = (job *)arg;
    pthread_barrier_wait(w->barrier);
    w->started = now();
    switch (w->kind) {
#if HAS_BF16
    case BF16: w->sink = bf16_kernel(w->iterations, 1.0f); break;
#endif
#if HAS_AMX
    case AMX: w->sink = amx_kernel(w->iterations, 1.0f); break;
#endif
    default: w->sink = fp32_kernel(w->iterations, 1.0f);
    }
    w->ended = now();
    return NULL;
}

/* Seconds from the first start to the last end of ``threads`` threads running ``iterations`` each. */
static double timed(enum kind kind, int threads, long iterations, float *sink) {
    pthread_t *ids = malloc(sizeof(pthread_t) * threads);
    job *jobs = malloc(sizeof(job) * threads);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, threads);
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){kind, iterations, &barrier, 0.0, 0.0, 0.0f};
        pthread_create(&ids[t], NULL, worker, &jobs[t]);
    }
    double first = 0.0, last = 0.0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        if (t == 0 || jobs[t].started < first) first = jobs[t].started;
        if (jobs[t].ended > last) last = jobs[t].ended;
        *sink += jobs[t].sink;
    }
    pthread_barrier_destroy(&barrier);
    free(ids);
    free(jobs);
    return last - first;
}

/* Best GFLOP/s over REPEATS runs of about ``seconds`` each. */
static double peak(enum kind kind, int threads, double seconds, float *sink) {
    double flops_per_iteration = kind == FP32 ? 2.0 * LANES * CHAINS : kind == BF16 ? 64.0 * CHAINS : 0.0;
#if HAS_AMX
    if (kind == AMX) flops_per_iteration = AMX_FLOPS * AMX_STEPS;
#endif
    long iterations = 100000;
    double t = timed(kind, threads, iterations, sink);
    while (t < 0.02) {  /* calibrate: grow until one run is measurable */
        iterations *= 4;
        t = timed(kind, threads, iterations, sink);
    }
    iterations = (long)(iterations * seconds / t) + 1;
    double best = 0.0;
    for (int r = 0; r < REPEATS; r++) {
        double rate = flops_per_iteration * iterations * threads / timed(kind, threads, iterations, sink) / 1e9;
        if (rate > best) best = rate;
    }
    return best;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    double seconds = argc > 2 ? atof(argv[2]) : 0.1;
    if (threads < 1) threads = 1;
    float sink = 0.0f;
    double fp32_one = peak(FP32, 1, seconds, &sink);
    double fp32_all = peak(FP32, threads, seconds, &sink);
    printf("{\"isa\": \"%s\", \"lanes\": %d, \"chains\": %d, \"threads\": %d, \"fp32_gflops_1thread\": %.3f, "
           "\"fp32_gflops\": %.3f, ", ISA, LANES, CHAINS, threads, fp32_one, fp32_all);
#if HAS_BF16
    double bf16_one = peak(BF16, 1, seconds, &sink);
    printf("\"bf16_isa\": \"avx512_bf16 vdpbf16ps\", \"bf16_gflops_1thread\": %.3f, \"bf16_gflops\": %.3f, ",
           bf16_one, peak(BF16, threads, seconds, &sink));
#else
    printf("\"bf16_isa\": null, \"bf16_gflops_1thread\": null, \"bf16_gflops\": null, ");
#endif
#if HAS_AMX
    if (amx_granted()) {
        double amx_one = peak(AMX, 1, seconds, &sink);
        printf("\"amx_bf16_gflops_1thread\": %.3f, \"amx_bf16_gflops\": %.3f, \"amx_note\": null, ", amx_one,
               peak(AMX, threads, seconds, &sink));
    } else {
        printf("\"amx_bf16_gflops_1thread\": null, \"amx_bf16_gflops\": null, "
               "\"amx_note\": \"the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)\", ");
    }
#else
    printf("\"amx_bf16_gflops_1thread\": null, \"amx_bf16_gflops\": null, \"amx_note\": \"not built: no AMX\", ");
#endif
    printf("\"sink\": %g}\n", (double)sink);
    return 0;
}
