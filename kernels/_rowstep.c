/* One chunk of the distillation loss, row by row, in as few passes over memory as possible.
 *
 * The eager torch path (kernels/_core.py: chunk_step + chunk_grad) makes ~20 full passes over
 * each (rows x vocab) float32 block; at vocab 50265 a block of 512 rows is 103 MB, far bigger
 * than any cache, so that path is memory-bound. Here each thread owns whole rows: pass 1 reads
 * a row of student and teacher logits from memory (row max), passes 2 and 3 find the row
 * (2 x 200 KB at V = 50265) in its L2 cache. Same math and the same notation as _core.py:
 *   p = softmax(t / T), q = softmax(s / T), r = softmax(s)
 *   kl = sum_v p_v (t_v - s_v) / T + lse(s / T) - lse(t / T)     ce = lse(s) - s[label]
 *   grad (written over s) = k1 * r + kq * q - kt * p, and -mask * c_ce at the label, with
 *   k1 = mask * c_ce, kq = kt = mask * c_kl (probabilities normalised by their row sums).
 * Plain C, no torch headers: it is built in about a second with the system compiler at first
 * use (kernels/native.py) and loaded with ctypes; ctypes releases the GIL, and the rows are
 * split over POSIX threads. Sums are taken in float over blocks of BLOCK elements (so the
 * compiler can vectorise them) and accumulated in double across blocks.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024

/* exp(x) for x <= 0 (shifted logits), vectorisable: Cephes' expf polynomial (relative error
 * ~1e-7 on [-87, 0]); exactly 0 below -87.3 where float underflows anyway. */
static inline float exp_nonpos(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.3f ? -87.3f : x;
    float n = floorf(xc * log2e + 0.5f);
    float r = xc - n * ln2_hi - n * ln2_lo;
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    return x < -87.3f ? 0.0f : y;
}

static float row_max(const float *x, int64_t v) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < v; k++) m = x[k] > m ? x[k] : m;
    return m;
}

typedef struct {
    float *s;             /* (rows, ld) student logits in, gradient out (when want_grad) */
    float *t;             /* (rows, ld) teacher logits, overwritten; NULL: no teacher (kl = 0) */
    const int64_t *label; /* (rows,) or NULL: no CE */
    const float *mask;    /* (rows,) 1 = counted, 0 = masked */
    float *ce, *kl;       /* (rows,) outputs */
    int64_t rows, vocab, ld;
    float inv_t, c_ce, c_kl;
    int want_grad;
    int64_t row0, row1;   /* this thread's rows */
} job_t;

/* Pass 2 over one row: exponentials, their sums and the cross term. Keeps e_t in t, the
 * student's T-softmax numerator in eq (s itself when T == 1 or no CE) and, when CE needs its
 * own softmax (sep_ce), exp(s - ms) in s. Always inlined with constant flags, so every
 * combination compiles to its own branch-free vector loop. */
static inline __attribute__((always_inline)) void pass2(float *s, float *t, float *eq, int64_t V,
                                                        float ms, float mt, float inv_t,
                                                        const int sep_ce, const int has_t,
                                                        double *zq, double *z1, double *zt,
                                                        double *cross) {
    for (int64_t k0 = 0; k0 < V; k0 += BLOCK) {
        const int64_t k1 = k0 + BLOCK < V ? k0 + BLOCK : V;
        float bq = 0, b1 = 0, bt = 0, bc = 0;
#pragma omp simd reduction(+ : bq, b1, bt, bc)
        for (int64_t k = k0; k < k1; k++) {
            const float sv = s[k];
            const float a = sv - ms;
            const float e_q = exp_nonpos(a * inv_t);
            bq += e_q;
            if (sep_ce) {
                const float e_1 = exp_nonpos(a);
                b1 += e_1;
                s[k] = e_1;
            }
            eq[k] = e_q;
            if (has_t) {
                const float tv = t[k];
                const float e_t = exp_nonpos((tv - mt) * inv_t);
                bt += e_t;
                bc += e_t * (tv - sv);
                t[k] = e_t;
            }
        }
        *zq += bq; *z1 += b1; *zt += bt; *cross += bc;
    }
}

static void do_rows(const job_t *J, float *scratch) {
    const int64_t V = J->vocab;
    const float inv_t = J->inv_t;
    const int sep_ce = J->label != NULL && inv_t != 1.0f; /* CE needs its own T = 1 softmax */
    for (int64_t i = J->row0; i < J->row1; i++) {
        float *s = J->s + i * J->ld;
        float *t = J->t ? J->t + i * J->ld : NULL;
        const float ms = row_max(s, V);
        const float mt = t ? row_max(t, V) : 0.0f;
        const float s_lab = J->label ? s[J->label[i]] : 0.0f;
        /* pass 2: exponentials, their sums and the cross term; keeps e_t in t, the student's
         * T-softmax numerator in s (T == 1 or no CE) or in scratch, and exp(s - ms) in s. */
        double zq = 0, z1 = 0, zt = 0, cross = 0;
        if (sep_ce && t) pass2(s, t, scratch, V, ms, mt, inv_t, 1, 1, &zq, &z1, &zt, &cross);
        else if (sep_ce) pass2(s, t, scratch, V, ms, mt, inv_t, 1, 0, &zq, &z1, &zt, &cross);
        else if (t) pass2(s, t, s, V, ms, mt, inv_t, 0, 1, &zq, &z1, &zt, &cross);
        else pass2(s, t, s, V, ms, mt, inv_t, 0, 0, &zq, &z1, &zt, &cross);
        if (!sep_ce) z1 = zq;
        const double lse_q = (double)ms * inv_t + log(zq);
        J->kl[i] = t ? (float)(cross * inv_t / zt + lse_q - ((double)mt * inv_t + log(zt))) : 0.0f;
        J->ce[i] = J->label ? (float)((double)ms + log(z1) - s_lab) : 0.0f;
        if (!J->want_grad) continue;
        /* pass 3: the gradient, over s */
        const float mk = J->mask[i];
        const float kq = (float)(mk * J->c_kl / zq);
        const float kt = t ? (float)(mk * J->c_kl / zt) : 0.0f;
        const float k1 = (float)(mk * J->c_ce / z1);
        if (sep_ce && t) {
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = k1 * s[k] + kq * scratch[k] - kt * t[k];
        } else if (sep_ce) {
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = k1 * s[k] + kq * scratch[k];
        } else if (t) {
            const float kk = k1 + kq;
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = kk * s[k] - kt * t[k];
        } else {
            const float kk = k1 + kq;
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = kk * s[k];
        }
        if (J->label) s[J->label[i]] -= mk * J->c_ce;
    }
}

static void *worker(void *arg) {
    job_t *J = (job_t *)arg;
    float *scratch = NULL;
    if (J->label != NULL && J->inv_t != 1.0f) {
        scratch = (float *)malloc(sizeof(float) * (size_t)J->vocab);
        if (!scratch) return (void *)1;
    }
    do_rows(J, scratch);
    free(scratch);
    return NULL;
}

/* Returns 0 on success, nonzero when a thread or its scratch row could not be had. */
int distill_rowstep(float *s, float *t, const int64_t *label, const float *mask, float *ce,
                    float *kl, int64_t rows, int64_t vocab, int64_t ld, float inv_t, float c_ce,
                    float c_kl, int want_grad, int threads) {
    if (threads < 1) threads = 1;
    if (threads > rows) threads = (int)(rows > 0 ? rows : 1);
    if (threads > 256) threads = 256;
    job_t jobs[256];
    pthread_t tid[256];
    int started[256];
    int rc = 0;
    for (int w = 0; w < threads; w++) {
        job_t J = {s, t, label, mask, ce, kl, rows, vocab, ld, inv_t, c_ce, c_kl, want_grad,
                   rows * w / threads, rows * (w + 1) / threads};
        jobs[w] = J;
        started[w] = 0;
    }
    for (int w = 1; w < threads; w++)
        started[w] = pthread_create(&tid[w], NULL, worker, &jobs[w]) == 0;
    for (int w = 1; w < threads; w++)
        if (!started[w]) { /* no thread: do its rows here */
            if (worker(&jobs[w]) != NULL) rc = 1;
        }
    if (worker(&jobs[0]) != NULL) rc = 1;
    for (int w = 1; w < threads; w++) {
        void *ret = NULL;
        if (started[w]) {
            pthread_join(tid[w], &ret);
            if (ret != NULL) rc = 1;
        }
    }
    return rc;
}
