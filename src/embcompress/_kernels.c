/* Fused CPU kernels: the lookups of the frozen formats and two training hot spots.
 *
 * Lookups (codebook, hashed, tensor-train, factors): ids in, finished rows out, in one pass.
 * torch's path decodes a codebook row in several ops (gather the code bytes, widen them, add slot
 * offsets, gather the codewords, sum), each a full pass over N x slots temporaries; at 65,536 ids
 * that costs more than the rows themselves. Here each output row is written once, straight from
 * the packed codes and a cache-resident table. The hashed format likewise hashes, gathers, scales
 * and adds its bias per row; tt and factors do their small per-row products in registers.
 * Training: DPQ-SX's scores, codes, softmax and softmax backward, and the codebook gradient of a
 * bag sum (codes, frozen codebooks under training).
 *
 * The functions take the addresses of contiguous CPU tensors that the Python side
 * (embcompress/frozen/kernels.py) has checked for dtype, layout and size, and release the GIL.
 * Every id and every decoded table index is bounds-checked here as well: a bad id or a corrupt
 * code makes the call raise ValueError, it never reads outside a buffer. Copies, gathers and the
 * hashed scale/bias equal torch's path bit for bit (built with -ffp-contract=off); sums and
 * products (codebook sums, tt, factors, DPQ) differ from it by float rounding only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define MAX_THREADS 64
#define MIN_ROWS_PER_THREAD 1024 /* below this a thread costs more than it saves */
/* Rows ahead whose stored bytes are prefetched. Random ids miss the cache on every row; without
 * prefetching each row waited ~100 ns on its own miss (65,536 rows: 9 ms where 4,096 took 0.2). */
#define PREFETCH_AHEAD 16

enum { OK = 0, BAD_ID = 1, BAD_CODE = 2, NO_MEMORY = 3 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One build for every x86-64 machine; the loader picks the AVX-512 or AVX2 clone where the CPU has it. */
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

/* -- running a row range on several threads ----------------------------------------------- */

typedef void (*row_worker)(void *job, int64_t start, int64_t stop, int *error);

typedef struct {
    row_worker work;
    void *job;
    int64_t start, stop;
    int error;
} chunk;

static void *run_chunk(void *arg) {
    chunk *c = (chunk *)arg;
    c->work(c->job, c->start, c->stop, &c->error);
    return NULL;
}

/* Splits [0, n) into up to `threads` chunks of at least `min_chunk` items; chunk 0 runs on the
 * calling thread. Returns the first error any chunk reported. */
static int run_parallel(row_worker work, void *job, int64_t n, int threads, int64_t min_chunk) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / min_chunk) threads = (int)(n / min_chunk);
    if (threads < 1) threads = 1;
    chunk chunks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        chunks[t] = (chunk){work, job, n * t / threads, n * (t + 1) / threads, OK};
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, run_chunk, &chunks[t]) == 0;
        if (!started[t]) run_chunk(&chunks[t]); /* no thread to be had: do it here */
    }
    run_chunk(&chunks[0]);
    int error = chunks[0].error;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
        if (error == OK) error = chunks[t].error;
    }
    return error;
}

/* Outputs of at least this many bytes are written with streaming stores: far larger than the L2
 * cache, they would only evict the tables being read, and each ordinary store first reads its
 * cache line. One core, 65,536 dpq-shaped rows: 0.85 ms streamed, 1.5 ms stored; on two cores, in
 * benchmarks/perf.py (two runs each): dpq 1.93-2.00x nn.Embedding streamed, 1.40-1.94x stored;
 * codes (4-bit, sum) 1.00-1.10x vs 0.79-0.81x; hash and memcom equal or better. */
#define STREAM_MIN_BYTES ((int64_t)8 << 20)

/* Streaming needs SSE2, rows of whole 16-byte groups and a 16-byte aligned output. */
static int can_stream(const float *out, int64_t n, int64_t row_floats, int64_t piece_floats) {
#if defined(__SSE2__)
    return n * row_floats * (int64_t)sizeof(float) >= STREAM_MIN_BYTES && row_floats % 4 == 0 &&
           piece_floats % 4 == 0 && ((uintptr_t)out & 15) == 0;
#else
    (void)out, (void)n, (void)row_floats, (void)piece_floats;
    return 0;
#endif
}

/* dst[0:count] = src[0:count] (* scale) (+ bias), count a multiple of 4, dst 16-byte aligned,
 * bypassing the cache. The same float operations as the ordinary path. */
static inline __attribute__((always_inline)) void stream_row(float *dst, const float *src, int64_t count,
                                                            int has_scale, float scale, int has_bias, float bias) {
#if defined(__SSE2__)
    const __m128 scale4 = _mm_set1_ps(scale), bias4 = _mm_set1_ps(bias);
    for (int64_t k = 0; k < count; k += 4) {
        __m128 v = _mm_loadu_ps(src + k);
        if (has_scale) v = _mm_mul_ps(v, scale4);
        if (has_bias) v = _mm_add_ps(v, bias4);
        _mm_stream_ps(dst + k, v);
    }
#else
    (void)dst, (void)src, (void)count, (void)has_scale, (void)scale, (void)has_bias, (void)bias;
#endif
}

static inline void stream_fence(int streamed) {
#if defined(__SSE2__)
    if (streamed) _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
#else
    (void)streamed;
#endif
}

static PyObject *raise_for(int error) {
    if (error == BAD_ID) {
        PyErr_SetString(PyExc_ValueError, "an id is outside [0, num_embeddings)");
    } else if (error == NO_MEMORY) {
        PyErr_NoMemory();
    } else if (error == BAD_CODE) {
        PyErr_SetString(PyExc_ValueError,
                        "a stored code points past its codebook: the packed codes are corrupt");
    }
    return error == OK ? (Py_INCREF(Py_None), Py_None) : NULL;
}

/* Every entry point ends here: `work` over [0, n) with the GIL released, then None or the error. */
static PyObject *call_parallel(row_worker work, void *job, int64_t n, int threads, int64_t min_chunk) {
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = run_parallel(work, job, n, threads, min_chunk);
    Py_END_ALLOW_THREADS
    return raise_for(error);
}

/* -- codebook format ---------------------------------------------------------------------- */

typedef struct {
    const int64_t *ids;
    int64_t rows;             /* num_embeddings */
    const uint8_t *packed;
    int64_t packed_len;
    int64_t row_bits;         /* bits of one row's codes */
    int slot_bits;            /* bits of one slot index: 8 (byte-indexed tables), 16, or the code bits */
    int64_t slots;            /* table lookups per row */
    const int32_t *offsets;   /* (slots,) first table row of each slot */
    const float *table;       /* (table_rows, width) */
    int64_t table_rows, width;
    int sum;                  /* 1: add the slots' rows; 0: concatenate them */
    float *out;               /* (n, sum ? width : slots * width) */
    int check_codes;          /* 0 when no slot_bits-bit value can index past the table (checked once) */
    int stream;               /* write the output with streaming stores (see can_stream) */
} codebook_job;

/* Slot s of row `id`: slot_bits bits, little-endian, at bit id * row_bits + s * slot_bits. */
static inline uint32_t slot_value(const codebook_job *j, int64_t id, int64_t s) {
    int64_t bit = id * j->row_bits + s * j->slot_bits;
    int64_t byte = bit >> 3, last = j->packed_len - 1;
    /* Bytes past the end only feed bits above the code, which the mask drops. */
    uint32_t window = j->packed[byte];
    if (byte + 1 <= last) window |= (uint32_t)j->packed[byte + 1] << 8;
    if (byte + 2 <= last) window |= (uint32_t)j->packed[byte + 2] << 16;
    return (window >> (bit & 7)) & ((1u << j->slot_bits) - 1);
}

/* 16 floats as one value (GCC/Clang vector extension): one AVX-512 register, two AVX or four SSE
 * ones. Element-wise adds, so the sum is the same per-element float additions as a scalar loop. */
typedef float vec16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) vec16 load16(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The row loop, written once and specialized by its callers: with `width`, `byte_slots` and `sum`
 * known at compile time the copies and adds become a few vector moves and no library calls.
 * The job's fields are read into locals first: read through `j`, the compiler must assume each
 * store to the output may change them and reloads them per slot, which kept the copies scalar. */
#define SUM_BLOCK 64 /* floats of a sum accumulated in registers across all slots */
#define MAX_SLOT_CHUNK 64 /* slots whose table rows are looked up before a sum adds them */

static inline __attribute__((always_inline)) void
codebook_rows_impl(const codebook_job *j, int64_t start, int64_t stop, int *error, const int64_t width,
                   const int byte_slots, const int sum) {
    const int64_t *ids = j->ids;
    const int64_t rows = j->rows, slots = j->slots, row_bits = j->row_bits, row_bytes = j->row_bits >> 3;
    const int64_t table_rows = j->table_rows;
    const int check_codes = j->check_codes, stream = j->stream;
    const uint8_t *packed = j->packed;
    const int32_t *offsets = j->offsets;
    const float *table = j->table;
    float *out_base = j->out;
    const int64_t out_width = sum ? width : slots * width;
    const float *srcs[MAX_SLOT_CHUNK];
    for (int64_t i = start; i < stop; i++) {
        if (i + PREFETCH_AHEAD < stop) {
            const int64_t ahead = ids[i + PREFETCH_AHEAD];
            if (ahead >= 0 && ahead < rows) __builtin_prefetch(packed + ((ahead * row_bits) >> 3));
        }
        const int64_t id = ids[i];
        if (id < 0 || id >= rows) {
            *error = BAD_ID;
            return;
        }
        const uint8_t *row = packed + id * row_bytes;
        float *restrict out = out_base + i * out_width;
        if (!sum) { /* concat: each slot's table row is copied straight to its place */
            for (int64_t s = 0; s < slots; s++) {
                const uint32_t value = byte_slots ? row[s] : slot_value(j, id, s);
                const int64_t index = (int64_t)value + offsets[s];
                if (check_codes && (index < 0 || index >= table_rows)) {
                    *error = BAD_CODE;
                    return;
                }
                if (stream) {
                    stream_row(out + s * width, table + index * width, width, 0, 0.0f, 0, 0.0f);
                } else {
                    memcpy(out + s * width, table + index * width, (size_t)width * sizeof(float));
                }
            }
            continue;
        }
        for (int64_t first = 0; first < slots; first += MAX_SLOT_CHUNK) {
            const int64_t count = slots - first < MAX_SLOT_CHUNK ? slots - first : MAX_SLOT_CHUNK;
            for (int64_t c = 0; c < count; c++) {
                const int64_t s = first + c;
                const uint32_t value = byte_slots ? row[s] : slot_value(j, id, s);
                const int64_t index = (int64_t)value + offsets[s];
                if (check_codes && (index < 0 || index >= table_rows)) {
                    *error = BAD_CODE;
                    return;
                }
                srcs[c] = table + index * width;
            }
            /* Sum: each block of the row stays in registers while every slot adds into it, in slot
             * order (the same additions, in the same order, as torch's embedding_bag). */
            int64_t k0 = 0;
            for (; k0 + SUM_BLOCK <= width; k0 += SUM_BLOCK) {
                vec16 acc[SUM_BLOCK / 16];
                const float *init = first == 0 ? srcs[0] + k0 : out + k0;
                for (int v = 0; v < SUM_BLOCK / 16; v++) acc[v] = load16(init + 16 * v);
                for (int64_t c = first == 0; c < count; c++) {
                    for (int v = 0; v < SUM_BLOCK / 16; v++) acc[v] += load16(srcs[c] + k0 + 16 * v);
                }
                for (int v = 0; v < SUM_BLOCK / 16; v++) {
                    if (stream && first + count == slots) {
                        stream_row(out + k0 + 16 * v, (const float *)&acc[v], 16, 0, 0.0f, 0, 0.0f);
                    } else {
                        memcpy(out + k0 + 16 * v, &acc[v], sizeof acc[v]);
                    }
                }
            }
            for (int64_t k = k0; k < width; k++) {
                float acc = first == 0 ? srcs[0][k] : out[k];
                for (int64_t c = first == 0; c < count; c++) acc += srcs[c][k];
                out[k] = acc;
            }
        }
    }
}

#define SPECIALIZE(name, W, BYTES, SUM)                                                         \
    HOT static void name(void *job, int64_t start, int64_t stop, int *error) {                 \
        const codebook_job *j = (const codebook_job *)job;                                      \
        codebook_rows_impl(j, start, stop, error, (W) ? (W) : j->width, BYTES, SUM);           \
        stream_fence(j->stream);                                                                \
    }
SPECIALIZE(concat_bytes_w4, 4, 1, 0)
SPECIALIZE(concat_bytes_w8, 8, 1, 0)
SPECIALIZE(concat_bytes_w16, 16, 1, 0)
SPECIALIZE(concat_bytes, 0, 1, 0)
SPECIALIZE(concat_bits, 0, 0, 0)
SPECIALIZE(sum_bytes, 0, 1, 1)
SPECIALIZE(sum_bits, 0, 0, 1)

static row_worker codebook_worker(const codebook_job *j) {
    const int bytes = j->slot_bits == 8;
    if (j->sum) return bytes ? sum_bytes : sum_bits;
    if (!bytes) return concat_bits;
    switch (j->width) {
    case 4: return concat_bytes_w4;
    case 8: return concat_bytes_w8;
    case 16: return concat_bytes_w16;
    default: return concat_bytes;
    }
}

typedef void (*decode_rows)(const void *format_job, const int64_t *ids, int64_t count, float *out, int *error);
typedef int64_t (*accumulate_rows)(const void *format_job, const int64_t *ids, int64_t count, int64_t ahead,
                                   const float *weights, int64_t padding_idx, float *acc, int *error);
static PyObject *run_bags(decode_rows decode, accumulate_rows accumulate, const void *format_job,
                          const int64_t *ids, int64_t n, const int64_t *offsets, int64_t bags, const float *weights,
                          int64_t width, int64_t padding_idx, int mean, float *out, int threads);
static void decode_codebook(const void *format_job, const int64_t *ids, int64_t count, float *out, int *error);
static accumulate_rows codebook_accumulator(const codebook_job *j);
static void decode_hashed(const void *format_job, const int64_t *ids, int64_t count, float *out, int *error);

/* The lookup entry points take optional bag arguments (offsets, bags, weights, padding_idx, mean):
 * with offsets, `out` receives the pooled bags instead of the rows (see run_bags). */
static PyObject *codebook_lookup(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long ids, packed, offsets, table, out, bag_offsets = 0, weights = 0;
    long long n, packed_len, row_bits, slots, table_rows, width, rows, bags = 0, padding_idx = -1;
    int slot_bits, sum, threads, mean = 0;
    if (!PyArg_ParseTuple(args, "KLLKLLiLKKLLpKi|KLKLp", &ids, &n, &rows, &packed, &packed_len, &row_bits,
                          &slot_bits, &slots, &offsets, &table, &table_rows, &width, &sum, &out,
                          &threads, &bag_offsets, &bags, &weights, &padding_idx, &mean)) {
        return NULL;
    }
    if (slot_bits < 1 || slot_bits > 16 || (slot_bits == 8 && row_bits % 8) || slots < 1 ||
        width < 1 || packed_len < 1 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "codebook_lookup: inconsistent layout arguments");
        return NULL;
    }
    if (rows > 0 && ((rows - 1) * row_bits + slots * slot_bits + 7) / 8 > packed_len) {
        PyErr_SetString(PyExc_ValueError, "codebook_lookup: packed codes are shorter than the rows need");
        return NULL;
    }
    codebook_job job = {(const int64_t *)ids, rows, (const uint8_t *)packed, packed_len, row_bits,
                        slot_bits, slots, (const int32_t *)offsets, (const float *)table,
                        table_rows, width, sum, (float *)out, 0, 0};
    job.stream = can_stream(job.out, n, sum ? width : slots * width, sum ? 16 : width);
    for (int64_t s = 0; s < slots; s++) { /* can some stored value point outside the table? */
        const int64_t first = job.offsets[s], last = first + ((int64_t)1 << slot_bits) - 1;
        if (first < 0 || last >= table_rows) job.check_codes = 1;
    }
    if (bag_offsets) {
        return run_bags(decode_codebook, codebook_accumulator(&job), &job, job.ids, n, (const int64_t *)bag_offsets,
                        bags, (const float *)weights, sum ? width : slots * width, padding_idx, mean, job.out,
                        threads);
    }
    return call_parallel(codebook_worker(&job), &job, n, threads, MIN_ROWS_PER_THREAD);
}

/* -- hashed format ------------------------------------------------------------------------ */

typedef struct {
    const int64_t *ids;
    int64_t rows;
    int universal;           /* 0: id mod buckets; 1: ((a * id + b) mod prime) mod buckets */
    int64_t a, b, prime, buckets;
    const float *table;      /* (buckets, width) */
    int64_t width;
    const float *scale;      /* (rows,) or NULL */
    const float *bias;       /* (rows,) or NULL */
    float *out;              /* (n, width) */
    int fast_universal;      /* prime == 2^31 - 1 and 0 <= a, b < 2^31: see bucket_of */
    int stream;              /* write the output with streaming stores (see can_stream) */
} hashed_job;

#define MERSENNE_31 ((uint64_t)0x7fffffff)

/* torch's integer remainder: the result takes the divisor's sign. */
static inline int64_t floor_mod(int64_t x, int64_t m) {
    int64_t r = x % m;
    return (r != 0 && ((r < 0) != (m < 0))) ? r + m : r;
}

static inline int64_t bucket_of(const hashed_job *j, int64_t id) {
    if (!j->universal) return floor_mod(id, j->buckets);
    if (j->fast_universal && (uint64_t)id < ((uint64_t)1 << 32)) {
        /* a, b < 2^31 = prime + 1 and id < 2^32: a * id + b < 2^63 never wraps, and mod 2^31 - 1
         * folds the high bits onto the low ones (2^31 = 1 mod p), so no 64-bit division; the
         * bucket is then a 32-bit remainder. Same value as the general path below. */
        uint64_t x = (uint64_t)j->a * (uint64_t)id + (uint64_t)j->b;
        x = (x & MERSENNE_31) + (x >> 31);
        x = (x & MERSENNE_31) + (x >> 31);
        if (x >= MERSENNE_31) x -= MERSENNE_31;
        return (int64_t)((uint32_t)x % (uint32_t)j->buckets);
    }
    /* int64 arithmetic that wraps like torch's (unsigned multiply, then reinterpret). */
    const int64_t mixed = (int64_t)((uint64_t)id * (uint64_t)j->a + (uint64_t)j->b);
    return floor_mod(floor_mod(mixed, j->prime), j->buckets);
}

#define RING 32 /* buckets computed ahead (> PREFETCH_AHEAD, a power of two) */

HOT static void hashed_rows(void *job, int64_t start, int64_t stop, int *error) {
    const hashed_job *j = (const hashed_job *)job;
    const int64_t width = j->width, rows = j->rows;
    const int64_t *ids = j->ids;
    const float *table = j->table, *scale_base = j->scale, *bias_base = j->bias;
    float *out_base = j->out;
    int64_t ring[RING]; /* ring[i % RING]: bucket of row i, computed PREFETCH_AHEAD rows early */
    for (int64_t i = start; i < stop && i < start + PREFETCH_AHEAD; i++) {
        if (ids[i] < 0 || ids[i] >= rows) {
            *error = BAD_ID;
            return;
        }
        ring[i % RING] = bucket_of(j, ids[i]);
    }
    for (int64_t i = start; i < stop; i++) {
        const int64_t next = i + PREFETCH_AHEAD;
        if (next < stop) { /* hash a row ahead and prefetch its bucket row and per-row scalars */
            const int64_t ahead = ids[next];
            if (ahead < 0 || ahead >= rows) {
                *error = BAD_ID;
                return;
            }
            const int64_t bucket = bucket_of(j, ahead);
            ring[next % RING] = bucket;
            if (scale_base) __builtin_prefetch(scale_base + ahead);
            if (bias_base) __builtin_prefetch(bias_base + ahead);
            for (int64_t k = 0; k < width; k += 16) __builtin_prefetch(table + bucket * width + k);
        }
        const int64_t id = ids[i];
        const float *restrict src = table + ring[i % RING] * width;
        float *restrict out = out_base + i * width;
        if (j->stream) {
            stream_row(out, src, width, scale_base != NULL, scale_base ? scale_base[id] : 0.0f, bias_base != NULL,
                       bias_base ? bias_base[id] : 0.0f);
            continue;
        }
        if (scale_base) {
            const float scale = scale_base[id];
            for (int64_t k = 0; k < width; k++) out[k] = src[k] * scale;
        } else {
            memcpy(out, src, (size_t)width * sizeof(float));
        }
        if (bias_base) {
            const float bias = bias_base[id];
            for (int64_t k = 0; k < width; k++) out[k] += bias;
        }
    }
    stream_fence(j->stream);
}

static PyObject *hashed_lookup(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long ids, table, scale, bias, out, bag_offsets = 0, weights = 0;
    long long n, rows, a, b, prime, buckets, width, bags = 0, padding_idx = -1;
    int universal, threads, mean = 0;
    if (!PyArg_ParseTuple(args, "KLLpLLLLKLKKKi|KLKLp", &ids, &n, &rows, &universal, &a, &b, &prime, &buckets,
                          &table, &width, &scale, &bias, &out, &threads, &bag_offsets, &bags, &weights,
                          &padding_idx, &mean)) {
        return NULL;
    }
    if (buckets < 1 || width < 1 || n < 0 || (universal && prime < 1)) {
        PyErr_SetString(PyExc_ValueError, "hashed_lookup: inconsistent hash or table arguments");
        return NULL;
    }
    hashed_job job = {(const int64_t *)ids, rows, universal, a, b, prime, buckets,
                      (const float *)table, width, (const float *)scale, (const float *)bias,
                      (float *)out, 0, 0};
    job.stream = can_stream(job.out, n, width, width);
    job.fast_universal = universal && (uint64_t)prime == MERSENNE_31 && a >= 0 && b >= 0 &&
                         (uint64_t)a <= MERSENNE_31 && (uint64_t)b <= MERSENNE_31 &&
                         (uint64_t)buckets <= UINT32_MAX;
    if (bag_offsets) {
        return run_bags(decode_hashed, NULL, &job, job.ids, n, (const int64_t *)bag_offsets, bags,
                        (const float *)weights, width, padding_idx, mean, job.out, threads);
    }
    return call_parallel(hashed_rows, &job, n, threads, MIN_ROWS_PER_THREAD);
}

/* -- bags: pooled rows without the (N, d) intermediate ----------------------------------- */

/* nn.EmbeddingBag over a decoded format: each bag's ids are decoded in chunks of BAG_CHUNK rows into
 * a per-thread scratch (cache-resident) and added, weighted, into the bag's output row; no (N, d)
 * table of rows is ever written. The decode is the format's own lookup loop, called on a copy of
 * its job whose ids and output point at the chunk and the scratch. */
#define BAG_CHUNK 64

static void decode_codebook(const void *format_job, const int64_t *ids, int64_t count, float *out, int *error) {
    codebook_job j = *(const codebook_job *)format_job;
    j.ids = ids, j.out = out, j.stream = 0;
    codebook_worker(&j)(&j, 0, count, error);
}

static void decode_hashed(const void *format_job, const int64_t *ids, int64_t count, float *out, int *error) {
    hashed_job j = *(const hashed_job *)format_job;
    j.ids = ids, j.out = out, j.stream = 0;
    hashed_rows(&j, 0, count, error);
}

/* Concatenated codebook rows whose slots are whole bytes (DPQ, PQ): each slot's table row is added
 * straight into its part of the bag's output row, with no decoded copy of the row in between; the
 * additions per output float are the ones the decode-then-add path makes, in the same order, so
 * the result is the same to the bit. Code rows are prefetched PREFETCH_AHEAD ids ahead, across
 * bag boundaries (`ahead` ids follow ids[0] in the caller's array). */
static inline __attribute__((always_inline)) int64_t
concat_accumulate_impl(const codebook_job *j, const int64_t *ids, int64_t count, int64_t ahead,
                       const float *weights, int64_t padding_idx, float *restrict acc, int *error,
                       const int64_t width) {
    const int64_t rows = j->rows, slots = j->slots, row_bytes = j->row_bits >> 3, table_rows = j->table_rows;
    const int check_codes = j->check_codes;
    const uint8_t *packed = j->packed;
    const int32_t *offsets = j->offsets;
    const float *table = j->table;
    int64_t kept = 0;
    for (int64_t i = 0; i < count; i++) {
        if (i + PREFETCH_AHEAD < ahead) {
            const int64_t next = ids[i + PREFETCH_AHEAD];
            if (next >= 0 && next < rows) __builtin_prefetch(packed + next * row_bytes);
        }
        const int64_t id = ids[i];
        if (id < 0 || id >= rows) {
            *error = BAD_ID;
            return kept;
        }
        if (id == padding_idx) continue;
        kept++;
        const uint8_t *row = packed + id * row_bytes;
        for (int64_t s = 0; s < slots; s++) {
            const int64_t index = (int64_t)row[s] + offsets[s];
            if (check_codes && (index < 0 || index >= table_rows)) {
                *error = BAD_CODE;
                return kept;
            }
            const float *restrict src = table + index * width;
            float *restrict dst = acc + s * width;
            if (weights) {
                const float w = weights[i];
                for (int64_t k = 0; k < width; k++) dst[k] += src[k] * w;
            } else {
                for (int64_t k = 0; k < width; k++) dst[k] += src[k];
            }
        }
    }
    return kept;
}

#define SPECIALIZE_ACCUMULATE(name, W)                                                                 \
    HOT static int64_t name(const void *job, const int64_t *ids, int64_t count, int64_t ahead,        \
                            const float *weights, int64_t padding_idx, float *acc, int *error) {      \
        const codebook_job *j = (const codebook_job *)job;                                            \
        return concat_accumulate_impl(j, ids, count, ahead, weights, padding_idx, acc, error,         \
                                      (W) ? (W) : j->width);                                          \
    }
SPECIALIZE_ACCUMULATE(concat_accumulate_w4, 4)
SPECIALIZE_ACCUMULATE(concat_accumulate_w8, 8)
SPECIALIZE_ACCUMULATE(concat_accumulate_w16, 16)
SPECIALIZE_ACCUMULATE(concat_accumulate, 0)

/* The direct bag path of a codebook job, or NULL (sums decode each row first: a row's slots are added
 * before the row joins the bag, as in the row lookup, so bags and rows round alike). */
static accumulate_rows codebook_accumulator(const codebook_job *j) {
    if (j->sum || j->slot_bits != 8) return NULL;
    switch (j->width) {
    case 4: return concat_accumulate_w4;
    case 8: return concat_accumulate_w8;
    case 16: return concat_accumulate_w16;
    default: return concat_accumulate;
    }
}

typedef struct {
    decode_rows decode;
    accumulate_rows accumulate;   /* rows added straight into the bag, or NULL: decode into a scratch */
    const void *format_job;
    const int64_t *ids, *offsets; /* offsets (bags + 1): bag b holds ids[offsets[b]:offsets[b + 1]] */
    int64_t n;                    /* ids in all */
    const float *weights;         /* per id, or NULL */
    int64_t width, padding_idx;   /* padding_idx < 0: none; padding ids take no part, as in nn.EmbeddingBag */
    int mean;
    float *out;                   /* (bags, width) */
} bag_job;

HOT static void bag_rows(void *job, int64_t start, int64_t stop, int *error) {
    const bag_job *j = (const bag_job *)job;
    const int64_t width = j->width;
    if (j->accumulate) {
        for (int64_t b = start; b < stop && *error == OK; b++) {
            float *restrict acc = j->out + b * width;
            memset(acc, 0, (size_t)width * sizeof(float));
            const int64_t first = j->offsets[b];
            const int64_t kept = j->accumulate(j->format_job, j->ids + first, j->offsets[b + 1] - first,
                                               j->n - first, j->weights ? j->weights + first : NULL,
                                               j->padding_idx, acc, error);
            if (j->mean && kept > 0) {
                for (int64_t k = 0; k < width; k++) acc[k] /= (float)kept;
            }
        }
        return;
    }
    float *scratch = aligned_alloc(64, (size_t)(BAG_CHUNK * width * (int64_t)sizeof(float) + 63) / 64 * 64);
    if (!scratch) {
        *error = NO_MEMORY;
        return;
    }
    for (int64_t b = start; b < stop && *error == OK; b++) {
        float *restrict acc = j->out + b * width;
        memset(acc, 0, (size_t)width * sizeof(float));
        int64_t kept = 0;
        for (int64_t first = j->offsets[b]; first < j->offsets[b + 1] && *error == OK; first += BAG_CHUNK) {
            const int64_t count = j->offsets[b + 1] - first < BAG_CHUNK ? j->offsets[b + 1] - first : BAG_CHUNK;
            j->decode(j->format_job, j->ids + first, count, scratch, error);
            for (int64_t r = 0; r < count && *error == OK; r++) {
                if (j->ids[first + r] == j->padding_idx) continue;
                const float *restrict row = scratch + r * width;
                kept++;
                if (j->weights) {
                    const float w = j->weights[first + r];
                    for (int64_t k = 0; k < width; k++) acc[k] += row[k] * w;
                } else {
                    for (int64_t k = 0; k < width; k++) acc[k] += row[k];
                }
            }
        }
        if (j->mean && kept > 0) {
            for (int64_t k = 0; k < width; k++) acc[k] /= (float)kept;
        }
    }
    free(scratch);
}

/* Shared by the format-specific entry points: checks the offsets, then pools the bags in parallel. */
static PyObject *run_bags(decode_rows decode, accumulate_rows accumulate, const void *format_job,
                          const int64_t *ids, int64_t n, const int64_t *offsets, int64_t bags, const float *weights,
                          int64_t width, int64_t padding_idx, int mean, float *out, int threads) {
    if (bags < 0 || width < 1 || (bags > 0 && offsets[0] != 0) || (bags > 0 && offsets[bags] != n)) {
        PyErr_SetString(PyExc_ValueError, "bag: offsets must start at 0 and end at the number of ids");
        return NULL;
    }
    for (int64_t b = 0; b < bags; b++) {
        if (offsets[b + 1] < offsets[b]) {
            PyErr_SetString(PyExc_ValueError, "bag: offsets must not decrease");
            return NULL;
        }
    }
    bag_job job = {decode, accumulate, format_job, ids, offsets, n, weights, width, padding_idx, mean, out};
    return call_parallel(bag_rows, &job, bags, threads, 16);
}

/* -- small products per row: tensor-train halves and factors ------------------------------ */

/* Functions marked CONTRACT (tt, factors, DPQ) sum products, so fused multiply-adds are allowed
 * in them (the rest of the file is built with -ffp-contract=off): their results differ from torch's
 * (whose matmuls block and fuse their own way) by float rounding only. */
#if defined(__GNUC__) && !defined(__clang__)
#define CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define CONTRACT
#endif

static inline __attribute__((always_inline)) vec16 splat16(float x) {
    const vec16 zero = {0};
    return zero + x;
}

/* out[0:width] = init + sum_k coef[k] * mat[k * width + 0:width] for k < depth (init NULL: zeros;
 * init may be out itself). Blocks of 64 floats stay in four registers across the whole sum. At
 * rank 16 and width 128 this runs at the FMA unit's peak (3.0 ms per 65,536 rows on one core). */
static inline __attribute__((always_inline)) void
combine_rows(float *out, const float *init, const float *restrict coef, const float *restrict mat,
             int64_t depth, int64_t width) {
    int64_t b = 0;
    for (; b + 64 <= width; b += 64) {
        vec16 a0, a1, a2, a3;
        if (init) {
            a0 = load16(init + b), a1 = load16(init + b + 16), a2 = load16(init + b + 32), a3 = load16(init + b + 48);
        } else {
            a0 = a1 = a2 = a3 = splat16(0.0f);
        }
        const float *m = mat + b;
        for (int64_t k = 0; k < depth; k++, m += width) {
            const vec16 c = splat16(coef[k]);
            a0 += c * load16(m), a1 += c * load16(m + 16), a2 += c * load16(m + 32), a3 += c * load16(m + 48);
        }
        memcpy(out + b, &a0, sizeof a0), memcpy(out + b + 16, &a1, sizeof a1);
        memcpy(out + b + 32, &a2, sizeof a2), memcpy(out + b + 48, &a3, sizeof a3);
    }
    for (; b + 16 <= width; b += 16) {
        vec16 acc = init ? load16(init + b) : splat16(0.0f);
        for (int64_t k = 0; k < depth; k++) acc += splat16(coef[k]) * load16(mat + k * width + b);
        memcpy(out + b, &acc, sizeof acc);
    }
    for (; b < width; b++) {
        float acc = init ? init[b] : 0.0f;
        for (int64_t k = 0; k < depth; k++) acc += coef[k] * mat[k * width + b];
        out[b] = acc;
    }
}

typedef int32_t ivec16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) ivec16 select16i(ivec16 mask, ivec16 a, ivec16 b) {
    return (a & mask) | (b & ~mask);
}

static inline __attribute__((always_inline)) vec16 select16(ivec16 mask, vec16 a, vec16 b) {
    return (vec16)select16i(mask, (ivec16)a, (ivec16)b);
}

/* exp of 16 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, exact
 * scaling by 2^n), within 2 ulp of expf; inputs below -87.3 give 0, NaN stays NaN. */
static inline __attribute__((always_inline)) vec16 exp16(vec16 x) {
    const vec16 hi = splat16(88.3762626647949f), lo = splat16(-87.3365447505531f);
    const ivec16 nan = x != x, too_low = x < lo;
    x = select16(x > hi, hi, x);
    x = select16(too_low, lo, x);
    const vec16 magic = splat16(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vec16 t = x * splat16(1.44269504088896341f) + magic;
    const ivec16 n = (ivec16)t - (ivec16)magic;
    const vec16 nf = t - magic;
    vec16 r = x - nf * splat16(0.693359375f);
    r = r - nf * splat16(-2.12194440e-4f);
    vec16 p = splat16(1.9875691500e-4f);
    p = p * r + splat16(1.3981999507e-3f);
    p = p * r + splat16(8.3334519073e-3f);
    p = p * r + splat16(4.1665795894e-2f);
    p = p * r + splat16(1.6666665459e-1f);
    p = p * r + splat16(5.0000001201e-1f);
    p = p * (r * r) + r + splat16(1.0f);
    const vec16 scaled = (vec16)((ivec16)p + (n << 23));
    return select16(nan, x, select16(too_low, splat16(0.0f), scaled));
}

/* tanh of 16 floats as sign(x) (1 - e) / (1 + e), e = exp(-2|x|): within a few float ulps of 1
 * absolutely (so relative error grows for |x| below ~1e-4); NaN stays NaN. */
static inline __attribute__((always_inline)) vec16 tanh16(vec16 x) {
    const ivec16 sign_bit = (ivec16){0} + INT32_MIN;
    const ivec16 sign = (ivec16)x & sign_bit;
    const vec16 e = exp16(splat16(-2.0f) * (vec16)((ivec16)x & ~sign_bit));
    const vec16 magnitude = (splat16(1.0f) - e) / (splat16(1.0f) + e);
    return (vec16)((ivec16)magnitude | sign);
}

/* 16 floats from p[0:count] (count <= 16), zeros after. */
static inline __attribute__((always_inline)) vec16 load_part(const float *p, int64_t count) {
    if (count == 16) return load16(p);
    vec16 v = splat16(0.0f);
    memcpy(&v, p, (size_t)count * sizeof(float));
    return v;
}

static inline __attribute__((always_inline)) void store_part(float *p, vec16 v, int64_t count) {
    memcpy(p, &v, (size_t)count * sizeof(float));
}

static inline __attribute__((always_inline)) float sum16(vec16 v) {
    float total = 0.0f;
    for (int r = 0; r < 16; r++) total += v[r];
    return total;
}

typedef struct {
    const int64_t *ids;
    int64_t rows;
    const float *left;       /* (left_rows, d_left, rank), or (left_rows, rank, d_left) if transposed */
    int64_t left_rows, d_left;
    const float *right;      /* (right_rows, rank, d_right), or (right_rows, d_right, rank) if transposed */
    int64_t right_rows, d_right, rank;
    int transposed;
    float *out;              /* (n, d_left * d_right); row id = left[id / right_rows] @ right[id % right_rows] */
} tt_job;

#define TT_MAX_ROW 4096 /* floats of a row built transposed on the stack before it is written out */

/* Row = L @ R, (d_left, rank) @ (rank, d_right). Plain layout: output row a is the combination of
 * R's rows with weights L[a, :]. Transposed layout (chosen when d_left > d_right, so the vector
 * width is the wider side): row^T[b] combines L^T's rows with weights R^T[b, :], then is
 * transposed into place. */
HOT CONTRACT static void tt_rows(void *job, int64_t start, int64_t stop, int *error) {
    const tt_job *j = (const tt_job *)job;
    const int64_t d_left = j->d_left, d_right = j->d_right, rank = j->rank, right_rows = j->right_rows;
    const int64_t left_floats = d_left * rank, right_floats = rank * d_right;
    float row_t[TT_MAX_ROW];
    for (int64_t i = start; i < stop; i++) {
        if (i + PREFETCH_AHEAD < stop) { /* the left half is the big one: fetch a row ahead */
            const int64_t ahead = j->ids[i + PREFETCH_AHEAD];
            if (ahead >= 0 && ahead < j->rows && ahead / right_rows < j->left_rows) {
                const float *row = j->left + (ahead / right_rows) * left_floats;
                for (int64_t k = 0; k < left_floats; k += 16) __builtin_prefetch(row + k);
            }
        }
        const int64_t id = j->ids[i];
        if (id < 0 || id >= j->rows || id / right_rows >= j->left_rows) {
            *error = BAD_ID;
            return;
        }
        const float *left = j->left + (id / right_rows) * left_floats;
        const float *right = j->right + (id % right_rows) * right_floats;
        float *out = j->out + i * d_left * d_right;
        if (!j->transposed) {
            for (int64_t a = 0; a < d_left; a++) combine_rows(out + a * d_right, NULL, left + a * rank, right, rank, d_right);
            continue;
        }
        for (int64_t b = 0; b < d_right; b++) combine_rows(row_t + b * d_left, NULL, right + b * rank, left, rank, d_left);
        for (int64_t a = 0; a < d_left; a++) {
            for (int64_t b = 0; b < d_right; b++) out[a * d_right + b] = row_t[b * d_left + a];
        }
    }
}

static PyObject *tt_lookup(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long ids, left, right, out;
    long long n, rows, left_rows, d_left, right_rows, d_right, rank;
    int transposed, threads;
    if (!PyArg_ParseTuple(args, "KLLKLLKLLLpKi", &ids, &n, &rows, &left, &left_rows, &d_left, &right,
                          &right_rows, &d_right, &rank, &transposed, &out, &threads)) {
        return NULL;
    }
    if (n < 0 || left_rows < 1 || right_rows < 1 || d_left < 1 || d_right < 1 || rank < 1 ||
        (transposed && d_left * d_right > TT_MAX_ROW)) {
        PyErr_SetString(PyExc_ValueError, "tt_lookup: inconsistent half-table shapes");
        return NULL;
    }
    tt_job job = {(const int64_t *)ids, rows, (const float *)left, left_rows, d_left, (const float *)right,
                  right_rows, d_right, rank, transposed, (float *)out};
    return call_parallel(tt_rows, &job, n, threads, MIN_ROWS_PER_THREAD);
}

typedef struct {
    const int64_t *ids;      /* NULL: row i of `codes` for output row i (codes gathered already) */
    int64_t rows;
    const float *codes;      /* (rows or n, rank) */
    int64_t rank;
    int activation;          /* applied to the codes first: 0 identity, 1 relu, 2 tanh */
    const float *basis;      /* (rank, dim) */
    int64_t dim;
    const float *bias;       /* (dim,) or NULL */
    float *out;              /* (n, dim) */
} factors_job;

HOT CONTRACT static void factors_rows(void *job, int64_t start, int64_t stop, int *error) {
    const factors_job *j = (const factors_job *)job;
    const int64_t rank = j->rank, dim = j->dim;
    float activated[64];
    for (int64_t i = start; i < stop; i++) {
        int64_t row = i;
        if (j->ids) {
            if (i + PREFETCH_AHEAD < stop) {
                const int64_t ahead = j->ids[i + PREFETCH_AHEAD];
                if (ahead >= 0 && ahead < j->rows) __builtin_prefetch(j->codes + ahead * rank);
            }
            row = j->ids[i];
            if (row < 0 || row >= j->rows) {
                *error = BAD_ID;
                return;
            }
        }
        const float *code = j->codes + row * rank;
        float *out = j->out + i * dim;
        for (int64_t k0 = 0; k0 < rank; k0 += 64) { /* ranks past 64 add onto the partial row */
            const int64_t depth = rank - k0 < 64 ? rank - k0 : 64;
            const float *coef = code + k0;
            if (j->activation == 1) {
                for (int64_t k = 0; k < depth; k++) { /* torch's relu: NaN stays NaN */
                    const float x = coef[k];
                    activated[k] = x > 0.0f || x != x ? x : 0.0f;
                }
                coef = activated;
            } else if (j->activation == 2) {
                for (int64_t k = 0; k < depth; k += 16) {
                    const int64_t count = depth - k < 16 ? depth - k : 16;
                    store_part(activated + k, tanh16(load_part(coef + k, count)), count);
                }
                coef = activated;
            }
            combine_rows(out, k0 ? out : j->bias, coef, j->basis + k0 * dim, depth, dim);
        }
    }
}

static PyObject *factors_lookup(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long ids, codes, basis, bias, out;
    long long n, rows, rank, dim;
    int activation, threads;
    if (!PyArg_ParseTuple(args, "KLLKLiKLKKi", &ids, &n, &rows, &codes, &rank, &activation, &basis, &dim, &bias,
                          &out, &threads)) {
        return NULL;
    }
    if (n < 0 || rank < 1 || dim < 1 || activation < 0 || activation > 2) {
        PyErr_SetString(PyExc_ValueError, "factors_lookup: inconsistent factor shapes or activation");
        return NULL;
    }
    factors_job job = {(const int64_t *)ids, rows, (const float *)codes, rank, activation, (const float *)basis,
                       dim, (const float *)bias, (float *)out};
    return call_parallel(factors_rows, &job, n, threads, MIN_ROWS_PER_THREAD);
}

/* -- backward of a bag sum over codebook rows --------------------------------------------- */

/* out[index[r, m]] += grad[r] for every row r and position m: the codebook gradient of
 * rows = sum_m table[index[r, m]]. torch's index_add / scatter_add took ~11 ms of CPU for 16,384
 * rows x 16 books x 128 dims; here each thread adds its rows into its own copy of the (small)
 * table, which stays in cache, and the copies are summed at the end. */
#define BAG_COPY_MAX_FLOATS ((int64_t)1 << 22) /* tables past 16 MB: one thread, no copies */

typedef struct {
    const int64_t *index;
    int64_t n, positions, table_rows, dim;
    const float *grad;
    float *out;          /* this thread's (table_rows, dim) accumulator, zeroed */
    int64_t start, stop;
    int error;
} bag_backward_job;

HOT static void *bag_backward_rows(void *arg) {
    bag_backward_job *j = (bag_backward_job *)arg;
    const int64_t dim = j->dim, positions = j->positions, table_rows = j->table_rows;
    for (int64_t r = j->start; r < j->stop; r++) {
        const float *g = j->grad + r * dim;
        for (int64_t m = 0; m < positions; m++) {
            const int64_t index = j->index[r * positions + m];
            if (index < 0 || index >= table_rows) {
                j->error = BAD_CODE;
                return NULL;
            }
            float *row = j->out + index * dim;
            int64_t k = 0;
            for (; k + 16 <= dim; k += 16) {
                const vec16 sum = load16(row + k) + load16(g + k);
                memcpy(row + k, &sum, sizeof sum);
            }
            for (; k < dim; k++) row[k] += g[k];
        }
    }
    return NULL;
}

static PyObject *bag_sum_backward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long index, grad, out;
    long long n, positions, table_rows, dim;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLKLKi", &index, &n, &positions, &table_rows, &grad, &dim, &out, &threads)) {
        return NULL;
    }
    if (n < 0 || positions < 1 || table_rows < 1 || dim < 1) {
        PyErr_SetString(PyExc_ValueError, "bag_sum_backward: inconsistent shapes");
        return NULL;
    }
    const int64_t table_floats = table_rows * dim;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / MIN_ROWS_PER_THREAD) threads = (int)(n / MIN_ROWS_PER_THREAD);
    if (threads < 1) threads = 1;
    bag_backward_job jobs[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    float *copies = NULL; /* the extra threads' accumulators */
    if (threads > 1 && table_floats <= BAG_COPY_MAX_FLOATS) {
        copies = calloc((size_t)(threads - 1) * (size_t)table_floats, sizeof(float));
        if (!copies) threads = 1; /* no memory for copies: one thread, no copies */
    } else {
        threads = 1;
    }
    int error = OK;
    Py_BEGIN_ALLOW_THREADS
    memset((float *)out, 0, (size_t)table_floats * sizeof(float));
    for (int t = 0; t < threads; t++) {
        jobs[t] = (bag_backward_job){(const int64_t *)index, n, positions, table_rows, dim, (const float *)grad,
                                     t == 0 ? (float *)out : copies + (int64_t)(t - 1) * table_floats,
                                     n * t / threads, n * (t + 1) / threads, OK};
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, bag_backward_rows, &jobs[t]) == 0;
        if (!started[t]) bag_backward_rows(&jobs[t]);
    }
    bag_backward_rows(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
        float *dst = (float *)out;
        const float *src = jobs[t].out;
        for (int64_t x = 0; x < table_floats; x++) dst[x] += src[x];
    }
    for (int t = 0; t < threads; t++) {
        if (error == OK) error = jobs[t].error;
    }
    Py_END_ALLOW_THREADS
    free(copies);
    return raise_for(error);
}

/* -- DPQ-SX training: scores, codes, softmax and its backward, 16 rows per vector --------- */

/* Layouts (D groups, w = d / D, K codewords, N rows): queries and their gradient (D, w, N),
 * keys and values (D, K, w), bias (D, K), probabilities (D, ceil(N / 16), K, 16), codes (D, N). In this layout 16
 * consecutive rows of one group are one vector, so each score, exponential and product below works
 * on 16 rows at once, and a group's whole forward (or backward) is one pass over its rows: no
 * (D, K, N) scores are written and reread, as torch's batched products and softmax did.
 * The limits keep a group's scratch (K + w vectors, K x w accumulators) small. */
#define DPQ_MAX_CODEWORDS 256
#define DPQ_MAX_WIDTH 64
#define DPQ_MAX_PAIRS 4096 /* K * w */
#define PROBS_AHEAD 4      /* blocks of probabilities prefetched ahead in the backward */

typedef struct {
    const float *qt, *keys, *bias, *values, *probs, *grad;
    int64_t width, n, codewords;
    float inv_tau;
    int64_t *codes;
    float *probs_out, *grad_qt, *grad_keys, *grad_bias;
} dpq_job;

/* Groups [start, stop): codes = first argmax_k (keys_k . q - bias_k) (K - 1 where a score is NaN,
 * as torch's amax-based argmax gives), and with probs_out, softmax((keys . q - bias) / tau). */
HOT CONTRACT static void dpq_forward_groups(void *job, int64_t start, int64_t stop, int *error) {
    const dpq_job *j = (const dpq_job *)job;
    const int64_t w = j->width, n = j->n, K = j->codewords;
    vec16 q[DPQ_MAX_WIDTH], scores[DPQ_MAX_CODEWORDS];
    (void)error;
    for (int64_t d = start; d < stop; d++) {
        const float *qt = j->qt + d * w * n, *keys = j->keys + d * K * w, *bias = j->bias + d * K;
        for (int64_t n0 = 0; n0 < n; n0 += 16) {
            const int64_t count = n - n0 < 16 ? n - n0 : 16;
            for (int64_t i = 0; i < w; i++) q[i] = load_part(qt + i * n + n0, count);
            vec16 best = splat16(0.0f);
            ivec16 index = {0}, nan = {0};
            for (int64_t k = 0; k < K; k++) {
                vec16 score = splat16(0.0f);
                for (int64_t i = 0; i < w; i++) score += splat16(keys[k * w + i]) * q[i];
                score -= splat16(bias[k]);
                scores[k] = score;
                nan |= score != score;
                if (k == 0) {
                    best = score;
                    continue;
                }
                const ivec16 better = score > best; /* strict: the first maximum wins ties */
                best = select16(better, score, best);
                index = select16i(better, (ivec16){0} + (int32_t)k, index);
            }
            index = select16i(nan, (ivec16){0} + (int32_t)(K - 1), index);
            for (int64_t r = 0; r < count; r++) j->codes[d * n + n0 + r] = index[r];
            if (!j->probs_out) continue;
            const vec16 top = best * splat16(j->inv_tau);
            vec16 total = splat16(0.0f);
            for (int64_t k = 0; k < K; k++) {
                scores[k] = exp16(scores[k] * splat16(j->inv_tau) - top);
                total += scores[k];
            }
            const vec16 inv_total = splat16(1.0f) / total;
            /* Blocked layout (D, ceil(N / 16), K, 16): the backward reads a block's K vectors from one
             * contiguous kilobyte; read K apart in (D, K, N), each was its own cache miss (31% of the
             * backward's time). Lanes past the last row hold zeros. */
            float *probs = j->probs_out + (d * ((n + 15) / 16) + n0 / 16) * K * 16;
            for (int64_t k = 0; k < K; k++) {
                vec16 prob = scores[k] * inv_total;
                for (int64_t r = count; r < 16; r++) prob[r] = 0.0f;
                memcpy(probs + k * 16, &prob, sizeof prob);
            }
        }
    }
}

/* Groups [start, stop) of the soft path's backward: with grad_probs_k = values_k . g and
 * grad_scores = p * (grad_probs - sum_k p grad_probs) / tau (softmax's backward):
 * grad_q = sum_k grad_scores_k keys_k, grad_keys_k = sum_rows grad_scores_k q, grad_bias_k = -sum_rows grad_scores_k. */
HOT CONTRACT static void dpq_backward_groups(void *job, int64_t start, int64_t stop, int *error) {
    const dpq_job *j = (const dpq_job *)job;
    const int64_t w = j->width, n = j->n, K = j->codewords;
    vec16 q[DPQ_MAX_WIDTH], g[DPQ_MAX_WIDTH], gq[DPQ_MAX_WIDTH], gp[DPQ_MAX_CODEWORDS], p[DPQ_MAX_CODEWORDS];
    /* 64-byte aligned: the compiler moves vec16 values with aligned vector instructions. */
    vec16 *acc_keys = aligned_alloc(64, (size_t)K * (size_t)w * sizeof(vec16));
    vec16 *acc_bias = aligned_alloc(64, (size_t)K * sizeof(vec16));
    if (!acc_keys || !acc_bias) {
        free(acc_keys), free(acc_bias);
        *error = NO_MEMORY;
        return;
    }
    for (int64_t d = start; d < stop; d++) {
        const float *qt = j->qt + d * w * n, *gt = j->grad + d * w * n;
        const float *probs = j->probs + d * ((n + 15) / 16) * K * 16; /* blocked, see the forward */
        const float *keys = j->keys + d * K * w, *values = j->values + d * K * w;
        for (int64_t x = 0; x < K * w; x++) acc_keys[x] = splat16(0.0f);
        for (int64_t k = 0; k < K; k++) acc_bias[k] = splat16(0.0f);
        for (int64_t n0 = 0; n0 < n; n0 += 16) {
            const int64_t count = n - n0 < 16 ? n - n0 : 16;
            for (int64_t i = 0; i < w; i++) {
                q[i] = load_part(qt + i * n + n0, count);
                g[i] = load_part(gt + i * n + n0, count);
                gq[i] = splat16(0.0f);
            }
            if (n0 + 16 * PROBS_AHEAD < n) { /* the forward's probabilities are long out of cache */
                const float *ahead = probs + (n0 / 16 + PROBS_AHEAD) * K * 16;
                for (int64_t k = 0; k < K; k++) __builtin_prefetch(ahead + k * 16);
            }
            vec16 dot = splat16(0.0f);
            for (int64_t k = 0; k < K; k++) {
                vec16 grad_prob = splat16(0.0f);
                for (int64_t i = 0; i < w; i++) grad_prob += splat16(values[k * w + i]) * g[i];
                gp[k] = grad_prob;
                p[k] = load16(probs + (n0 / 16 * K + k) * 16); /* zero past the last row: no contribution */
                dot += p[k] * grad_prob;
            }
            for (int64_t k = 0; k < K; k++) {
                const vec16 gs = p[k] * (gp[k] - dot) * splat16(j->inv_tau);
                acc_bias[k] -= gs;
                for (int64_t i = 0; i < w; i++) {
                    gq[i] += splat16(keys[k * w + i]) * gs;
                    acc_keys[k * w + i] += gs * q[i];
                }
            }
            for (int64_t i = 0; i < w; i++) store_part(j->grad_qt + d * w * n + i * n + n0, gq[i], count);
        }
        for (int64_t x = 0; x < K * w; x++) j->grad_keys[d * K * w + x] = sum16(acc_keys[x]);
        for (int64_t k = 0; k < K; k++) j->grad_bias[d * K + k] = sum16(acc_bias[k]);
    }
    free(acc_keys), free(acc_bias);
}

static int dpq_shape_ok(long long groups, long long width, long long n, long long codewords) {
    if (groups < 1 || width < 1 || width > DPQ_MAX_WIDTH || n < 0 || codewords < 1 ||
        codewords > DPQ_MAX_CODEWORDS || codewords * width > DPQ_MAX_PAIRS) {
        PyErr_SetString(PyExc_ValueError, "dpq kernels: shapes outside the supported range");
        return 0;
    }
    return 1;
}

static PyObject *dpq_sx_forward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long qt, keys, bias, codes, probs;
    long long groups, width, n, codewords;
    double inv_tau;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLKKLdKKi", &qt, &groups, &width, &n, &keys, &bias, &codewords, &inv_tau,
                          &codes, &probs, &threads) ||
        !dpq_shape_ok(groups, width, n, codewords)) {
        return NULL;
    }
    dpq_job job = {(const float *)qt, (const float *)keys, (const float *)bias, NULL, NULL, NULL, width, n,
                   codewords, (float)inv_tau, (int64_t *)codes, (float *)probs, NULL, NULL, NULL};
    return call_parallel(dpq_forward_groups, &job, groups, threads, 1);
}

static PyObject *dpq_sx_backward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long qt, keys, values, probs, grad, grad_qt, grad_keys, grad_bias;
    long long groups, width, n, codewords;
    double inv_tau;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLKKLKdKKKKi", &qt, &groups, &width, &n, &keys, &values, &codewords, &probs,
                          &inv_tau, &grad, &grad_qt, &grad_keys, &grad_bias, &threads) ||
        !dpq_shape_ok(groups, width, n, codewords)) {
        return NULL;
    }
    dpq_job job = {(const float *)qt, (const float *)keys, NULL, (const float *)values, (const float *)probs,
                   (const float *)grad, width, n, codewords, (float)inv_tau, NULL, NULL, (float *)grad_qt,
                   (float *)grad_keys, (float *)grad_bias};
    return call_parallel(dpq_backward_groups, &job, groups, threads, 1);
}

/* -- DPQ-VQ codes: nearest centroid under batch-normalized scores ------------------------- */

/* score_k = -||q - c_k||^2 (per group; layouts as for SX: qt (D, w, N), centroids (D, K, w)).
 * Statistics pass: per (group, k), the mean and biased variance of the scores over the N rows
 * (accumulated per vector of 16 rows in floats, across vectors in doubles). Codes pass: the first
 * k maximizing (score_k - mean_k) * inv_std_k (inv_std 1 and mean 0 without batch norm). torch's
 * path built six (N, D, K) temporaries for this (~60 ms of CPU at 16,384 x 32 x 16). */
typedef struct {
    const float *qt, *centroids;
    int64_t width, n, codewords;
    const float *mean, *inv_std;   /* (D, K) or NULL: no normalization */
    double *sum, *sum_sq;          /* (D, K) outputs of the statistics pass */
    int64_t *codes;                /* (D, N) output of the codes pass */
} vq_job;

static inline __attribute__((always_inline)) vec16 vq_score(const vec16 *q, const float *centroid, int64_t w) {
    vec16 score = splat16(0.0f);
    for (int64_t i = 0; i < w; i++) {
        const vec16 diff = q[i] - splat16(centroid[i]);
        score -= diff * diff;
    }
    return score;
}

HOT CONTRACT static void vq_stats_groups(void *job, int64_t start, int64_t stop, int *error) {
    const vq_job *j = (const vq_job *)job;
    const int64_t w = j->width, n = j->n, K = j->codewords;
    vec16 q[DPQ_MAX_WIDTH];
    (void)error;
    for (int64_t d = start; d < stop; d++) {
        const float *qt = j->qt + d * w * n, *centroids = j->centroids + d * K * w;
        for (int64_t k = 0; k < K; k++) j->sum[d * K + k] = j->sum_sq[d * K + k] = 0.0;
        for (int64_t n0 = 0; n0 < n; n0 += 16) {
            const int64_t count = n - n0 < 16 ? n - n0 : 16;
            for (int64_t i = 0; i < w; i++) q[i] = load_part(qt + i * n + n0, count);
            for (int64_t k = 0; k < K; k++) {
                vec16 score = vq_score(q, centroids + k * w, w);
                for (int64_t r = count; r < 16; r++) score[r] = 0.0f; /* padded rows take no part */
                j->sum[d * K + k] += sum16(score);
                j->sum_sq[d * K + k] += sum16(score * score);
            }
        }
    }
}

HOT CONTRACT static void vq_codes_groups(void *job, int64_t start, int64_t stop, int *error) {
    const vq_job *j = (const vq_job *)job;
    const int64_t w = j->width, n = j->n, K = j->codewords;
    vec16 q[DPQ_MAX_WIDTH];
    (void)error;
    for (int64_t d = start; d < stop; d++) {
        const float *qt = j->qt + d * w * n, *centroids = j->centroids + d * K * w;
        for (int64_t n0 = 0; n0 < n; n0 += 16) {
            const int64_t count = n - n0 < 16 ? n - n0 : 16;
            for (int64_t i = 0; i < w; i++) q[i] = load_part(qt + i * n + n0, count);
            vec16 best = splat16(0.0f);
            ivec16 index = {0};
            for (int64_t k = 0; k < K; k++) {
                vec16 score = vq_score(q, centroids + k * w, w);
                if (j->mean) score = (score - splat16(j->mean[d * K + k])) * splat16(j->inv_std[d * K + k]);
                if (k == 0) {
                    best = score;
                    continue;
                }
                const ivec16 better = score > best; /* strict: the first maximum wins ties */
                best = select16(better, score, best);
                index = select16i(better, (ivec16){0} + (int32_t)k, index);
            }
            for (int64_t r = 0; r < count; r++) j->codes[d * n + n0 + r] = index[r];
        }
    }
}

static PyObject *dpq_vq_stats(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long qt, centroids, sum, sum_sq;
    long long groups, width, n, codewords;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLKLKKi", &qt, &groups, &width, &n, &centroids, &codewords, &sum, &sum_sq,
                          &threads) ||
        !dpq_shape_ok(groups, width, n, codewords)) {
        return NULL;
    }
    vq_job job = {(const float *)qt, (const float *)centroids, width, n, codewords, NULL, NULL, (double *)sum,
                  (double *)sum_sq, NULL};
    return call_parallel(vq_stats_groups, &job, groups, threads, 1);
}

static PyObject *dpq_vq_codes(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long qt, centroids, mean, inv_std, codes;
    long long groups, width, n, codewords;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLKLKKKi", &qt, &groups, &width, &n, &centroids, &codewords, &mean, &inv_std,
                          &codes, &threads) ||
        !dpq_shape_ok(groups, width, n, codewords)) {
        return NULL;
    }
    vq_job job = {(const float *)qt, (const float *)centroids, width, n, codewords, (const float *)mean,
                  (const float *)inv_std, NULL, NULL, (int64_t *)codes};
    return call_parallel(vq_codes_groups, &job, groups, threads, 1);
}

static PyMethodDef methods[] = {
    {"codebook_lookup", codebook_lookup, METH_VARARGS,
     "Decode rows of bit-packed codes against a codebook table into a preallocated output."},
    {"hashed_lookup", hashed_lookup, METH_VARARGS,
     "Hash ids to buckets and write scale * table[bucket] + bias into a preallocated output."},
    {"tt_lookup", tt_lookup, METH_VARARGS,
     "Rows of a tensor train from its two cached half tables (one small matmul per row)."},
    {"factors_lookup", factors_lookup, METH_VARARGS,
     "Rows act(codes[id]) @ basis + bias of a factorized table (identity, relu or tanh)."},
    {"bag_sum_backward", bag_sum_backward, METH_VARARGS,
     "Codebook gradient of a bag sum: out[index[r, m]] += grad[r] (out is overwritten)."},
    {"dpq_sx_forward", dpq_sx_forward, METH_VARARGS,
     "DPQ-SX codes (first argmax of keys . q - bias) and, optionally, softmax probabilities."},
    {"dpq_sx_backward", dpq_sx_backward, METH_VARARGS,
     "DPQ-SX soft path backward: gradients of the queries, keys and bias from the probabilities."},
    {"dpq_vq_stats", dpq_vq_stats, METH_VARARGS,
     "DPQ-VQ: per group and centroid, the sum and sum of squares of -||q - c||^2 over the rows."},
    {"dpq_vq_codes", dpq_vq_codes, METH_VARARGS,
     "DPQ-VQ codes: first argmax of the (optionally batch-normalized) scores -||q - c||^2."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Fused CPU lookups for embcompress's frozen formats.", -1, methods};

/* The shape limits are exported so that the Python side picks the torch path past them. */
PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "TT_MAX_ROW", TT_MAX_ROW) ||
              PyModule_AddIntConstant(m, "DPQ_MAX_CODEWORDS", DPQ_MAX_CODEWORDS) ||
              PyModule_AddIntConstant(m, "DPQ_MAX_WIDTH", DPQ_MAX_WIDTH) ||
              PyModule_AddIntConstant(m, "DPQ_MAX_PAIRS", DPQ_MAX_PAIRS))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
