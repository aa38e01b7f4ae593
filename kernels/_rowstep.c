/* One chunk of the distillation loss, row by row, in as few passes over memory as possible.
 *
 * The eager torch path (kernels/_core.py: chunk_step + chunk_grad) makes ~20 full passes over
 * each (rows x vocab) float32 block; at vocab 50265 a block of 512 rows is 103 MB, far bigger
 * than any cache, so that path is memory-bound. Here each thread owns whole rows: pass 1 reads
 * a row of student and teacher logits from memory (row max), the later passes find the row
 * (2 x 200 KB at V = 50265) in its L2 cache. Same math and the same notation as _core.py:
 *   p = softmax(t / T), q = softmax(s / T), r = softmax(s)           ce = lse(s) - s[label]
 * and kl, the divergence D, with its gradient (written over s; plus -mask * c_ce at the label;
 * k1 = mask * c_ce, kq = mask * c_kl; probabilities normalised by their row sums):
 *   forward_kl (div 0), three passes:
 *     D = sum_v p_v (t_v - s_v) / T + lse(s / T) - lse(t / T)
 *     grad = k1 * r + kq * (q - p)
 *   reverse_kl (div 1), three passes; with d = s - t:
 *     D = E_q[d] / T + lse(t / T) - lse(s / T)
 *     grad = k1 * r + kq * q * (d - E_q[d]) / T
 *   jsd (div 2), four passes (pass 3 needs the row sums of pass 2 for log p and log q):
 *     m = beta p + (1 - beta) q, b = log q - log m
 *     D = beta sum_v p_v (log p_v - log m_v) + (1 - beta) sum_v q_v b_v
 *     grad = k1 * r + kq * (1 - beta) * q * (b - sum_v q_v b_v)
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
 * ~1e-7 on [-87, 0]); exactly 0 below -87.3 where float underflows anyway. A NaN x (what a
 * non-finite logit upstream becomes: inf - inf) gives NaN, without undefined behaviour: see 2^n. */
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
    /* 2^n in the exponent bits. n (integral, in [-126, 0] for x <= 0) is read from the bits of
     * n + 1.5 * 2^23, which hold it in their low mantissa bits, not converted with (int32_t)n:
     * converting a NaN to an int is undefined behaviour in C. A NaN reads as some bits here and
     * p, NaN too, makes the result NaN. Unsigned arithmetic: no shift or sum can overflow. */
    const float n_magic = n + 12582912.0f;
    uint32_t bits;
    memcpy(&bits, &n_magic, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    return x < -87.3f ? 0.0f : y;
}

/* log(1 + e) for 0 <= e <= 1, vectorisable: Cephes' logf polynomial (relative error ~1e-7) on
 * the reduced argument x, with 1 + e = 2^k (1 + x). Below sqrt 2, k = 0 and x = e exactly, so a
 * tiny e keeps its precision (1 + e would round it away); above, k = 1 and x = (e - 1) / 2. */
static inline float log1p_unit(float e) {
    const float k = e > 0.41421356f ? 1.0f : 0.0f;
    const float x = k != 0.0f ? (e - 1.0f) * 0.5f : e;
    const float z = x * x;
    float y = 7.0376836292e-2f;
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z;
    y += -2.12194440e-4f * k;
    y += -0.5f * z;
    return x + y + 0.693359375f * k;
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
    int div;              /* 0 forward_kl, 1 reverse_kl, 2 jsd (used only with a teacher) */
    double beta;          /* jsd's mixture weight, 0 < beta < 1 */
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

/* Reverse KL, pass 2 over one row: like pass2, but keeps d = s - t in t (the gradient needs
 * it) and sums e_q * d for E_q[d]. */
static inline __attribute__((always_inline)) void pass2_rev(float *s, float *t, float *eq, int64_t V,
                                                            float ms, float mt, float inv_t,
                                                            const int sep_ce, double *zq,
                                                            double *z1, double *zt, double *cross) {
    for (int64_t k0 = 0; k0 < V; k0 += BLOCK) {
        const int64_t k1 = k0 + BLOCK < V ? k0 + BLOCK : V;
        float bq = 0, b1 = 0, bt = 0, bc = 0;
#pragma omp simd reduction(+ : bq, b1, bt, bc)
        for (int64_t k = k0; k < k1; k++) {
            const float sv = s[k], tv = t[k];
            const float a = sv - ms;
            const float e_q = exp_nonpos(a * inv_t);
            bq += e_q;
            if (sep_ce) {
                const float e_1 = exp_nonpos(a);
                b1 += e_1;
                s[k] = e_1;
            }
            eq[k] = e_q;
            bt += exp_nonpos((tv - mt) * inv_t);
            const float d = sv - tv;
            bc += e_q * d;
            t[k] = d;
        }
        *zq += bq; *z1 += b1; *zt += bt; *cross += bc;
    }
}

static void rows_reverse(const job_t *J, float *scratch) {
    const int64_t V = J->vocab;
    const float inv_t = J->inv_t;
    const int sep_ce = J->label != NULL && inv_t != 1.0f;
    for (int64_t i = J->row0; i < J->row1; i++) {
        float *s = J->s + i * J->ld;
        float *t = J->t + i * J->ld;
        const float ms = row_max(s, V);
        const float mt = row_max(t, V);
        const float s_lab = J->label ? s[J->label[i]] : 0.0f;
        /* pass 2: sums; e_q in s (or scratch when CE needs exp(s - ms) in s), d in t */
        double zq = 0, z1 = 0, zt = 0, cross = 0;
        if (sep_ce) pass2_rev(s, t, scratch, V, ms, mt, inv_t, 1, &zq, &z1, &zt, &cross);
        else pass2_rev(s, t, s, V, ms, mt, inv_t, 0, &zq, &z1, &zt, &cross);
        if (!sep_ce) z1 = zq;
        const double mean_d = cross / zq;
        J->kl[i] = (float)(mean_d * inv_t + ((double)mt * inv_t + log(zt)) - ((double)ms * inv_t + log(zq)));
        J->ce[i] = J->label ? (float)((double)ms + log(z1) - s_lab) : 0.0f;
        if (!J->want_grad) continue;
        /* pass 3: the gradient, over s */
        const float mk = J->mask[i];
        const float kq = (float)(mk * J->c_kl * inv_t / zq);
        const float k1 = (float)(mk * J->c_ce / z1);
        const float md = (float)mean_d;
        if (sep_ce) {
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = k1 * s[k] + kq * scratch[k] * (t[k] - md);
        } else {
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = s[k] * (k1 + kq * (t[k] - md));
        }
        if (J->label) s[J->label[i]] -= mk * J->c_ce;
    }
}

/* JSD, pass 2 over one row: the row sums only (log p and log q need them before anything is
 * stored); exp(s - ms) goes to scratch when CE needs its own softmax. */
static inline __attribute__((always_inline)) void pass2_sums(const float *s, const float *t,
                                                             float *scratch, int64_t V, float ms,
                                                             float mt, float inv_t, const int sep_ce,
                                                             double *zq, double *z1, double *zt) {
    for (int64_t k0 = 0; k0 < V; k0 += BLOCK) {
        const int64_t k1 = k0 + BLOCK < V ? k0 + BLOCK : V;
        float bq = 0, b1 = 0, bt = 0;
#pragma omp simd reduction(+ : bq, b1, bt)
        for (int64_t k = k0; k < k1; k++) {
            const float a = s[k] - ms;
            bq += exp_nonpos(a * inv_t);
            if (sep_ce) {
                const float e_1 = exp_nonpos(a);
                b1 += e_1;
                scratch[k] = e_1;
            }
            bt += exp_nonpos((t[k] - mt) * inv_t);
        }
        *zq += bq; *z1 += b1; *zt += bt;
    }
}

static void rows_jsd(const job_t *J, float *scratch) {
    const int64_t V = J->vocab;
    const float inv_t = J->inv_t;
    const int sep_ce = J->label != NULL && inv_t != 1.0f;
    const double beta = J->beta, lb = log(beta), l1b = log1p(-beta);
    for (int64_t i = J->row0; i < J->row1; i++) {
        float *s = J->s + i * J->ld;
        float *t = J->t + i * J->ld;
        const float ms = row_max(s, V);
        const float mt = row_max(t, V);
        const float s_lab = J->label ? s[J->label[i]] : 0.0f;
        double zq = 0, z1 = 0, zt = 0;
        if (sep_ce) pass2_sums(s, t, scratch, V, ms, mt, inv_t, 1, &zq, &z1, &zt);
        else pass2_sums(s, t, scratch, V, ms, mt, inv_t, 0, &zq, &z1, &zt);
        if (!sep_ce) z1 = zq;
        const float lzq = (float)log(zq), lzt = (float)log(zt);
        /* pass 3: with delta = log(beta p) - log((1 - beta) q), taken from t - s in one rounding,
         * log(m / ((1 - beta) q)) = softplus(delta) and log(m / (beta p)) = softplus(-delta): small
         * where a token carries most of q, so b - E_q[b] = E_q[sp] - sp keeps its precision.
         * Both KL terms; q goes over s and softplus(delta) over t. */
        const float c = (float)(((double)ms - mt) * inv_t + log(zq) - log(zt) + lb - l1b);
        const float nlb = (float)-lb, nl1b = (float)-l1b;
        double dp = 0, dq = 0, mean_sp = 0;
        for (int64_t k0 = 0; k0 < V; k0 += BLOCK) {
            const int64_t k1 = k0 + BLOCK < V ? k0 + BLOCK : V;
            float bp = 0, bq = 0, bf = 0;
#pragma omp simd reduction(+ : bp, bq, bf)
            for (int64_t k = k0; k < k1; k++) {
                const float sv = s[k], tv = t[k];
                const float delta = (tv - sv) * inv_t + c;
                const float l = log1p_unit(exp_nonpos(delta > 0 ? -delta : delta));
                const float sp_pos = (delta > 0 ? delta : 0.0f) + l;
                const float sp_neg = (delta > 0 ? 0.0f : -delta) + l;
                const float q = exp_nonpos((sv - ms) * inv_t - lzq);
                const float p = exp_nonpos((tv - mt) * inv_t - lzt);
                bp += p * (nlb - sp_neg);
                bq += q * (nl1b - sp_pos);
                bf += q * sp_pos;
                s[k] = q;
                t[k] = sp_pos;
            }
            dp += bp; dq += bq; mean_sp += bf;
        }
        J->kl[i] = (float)(beta * dp + (1.0 - beta) * dq);
        J->ce[i] = J->label ? (float)((double)ms + log(z1) - s_lab) : 0.0f;
        if (!J->want_grad) continue;
        /* pass 4: the gradient, over s: b - E_q[b] = E_q[sp] - sp */
        const float mk = J->mask[i];
        const float kq = (float)(mk * J->c_kl * (1.0 - beta));
        const float mf = (float)mean_sp;
        if (sep_ce) {
            const float k1 = (float)(mk * J->c_ce / z1);
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = k1 * scratch[k] + kq * s[k] * (mf - t[k]);
        } else {
            const float k1 = mk * J->c_ce; /* r = q, already normalised */
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = s[k] * (k1 + kq * (mf - t[k]));
        }
        if (J->label) s[J->label[i]] -= mk * J->c_ce;
    }
}

/* Forward KL (and no teacher at all). */
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
    if (J->t != NULL && J->div == 1) rows_reverse(J, scratch);
    else if (J->t != NULL && J->div == 2) rows_jsd(J, scratch);
    else do_rows(J, scratch);
    free(scratch);
    return NULL;
}

/* Run fn over jobs[0..threads) (each `size` bytes), job 0 on this thread and the others on new
 * threads (one that cannot be started runs here too). Returns nonzero when any job did. */
static int run_jobs(void *(*fn)(void *), char *jobs, size_t size, int threads) {
    pthread_t tid[256];
    int started[256];
    int rc = 0;
    for (int w = 1; w < threads; w++) started[w] = pthread_create(&tid[w], NULL, fn, jobs + w * size) == 0;
    for (int w = 1; w < threads; w++)
        if (!started[w] && fn(jobs + w * size) != NULL) rc = 1;
    if (fn(jobs) != NULL) rc = 1;
    for (int w = 1; w < threads; w++) {
        void *ret = NULL;
        if (started[w]) {
            pthread_join(tid[w], &ret);
            if (ret != NULL) rc = 1;
        }
    }
    return rc;
}

static int clamp_threads(int threads, int64_t rows) {
    if (threads < 1) threads = 1;
    if (threads > rows) threads = (int)(rows > 0 ? rows : 1);
    return threads > 256 ? 256 : threads;
}

/* div: 0 forward_kl, 1 reverse_kl, 2 jsd (with 0 < beta < 1). Returns 0 on success, nonzero
 * when a thread or its scratch row could not be had. */
int distill_rowstep(float *s, float *t, const int64_t *label, const float *mask, float *ce,
                    float *kl, int64_t rows, int64_t vocab, int64_t ld, float inv_t, float c_ce,
                    float c_kl, int want_grad, int div, double beta, int threads) {
    threads = clamp_threads(threads, rows);
    job_t jobs[256];
    for (int w = 0; w < threads; w++) {
        job_t J = {s, t, label, mask, ce, kl, rows, vocab, ld, inv_t, c_ce, c_kl, want_grad, div, beta,
                   rows * w / threads, rows * (w + 1) / threads};
        jobs[w] = J;
    }
    return run_jobs(worker, (char *)jobs, sizeof(job_t), threads);
}

/* ---- The sparse loss's forward-KL row step (kernels/sparse.py) ----------------------------
 * For one block of student logits s (rows x vocab) and per row a support S of K listed ids
 * (repeats allowed: an id listed twice is one member of S) with the teacher's weights p on them
 * (already at temperature T, each entry its own: a repeat carries 0) and its tail mass m_t:
 *   z = s / T,  lse = lse(z),  lse_off = lse(z over the ids not in S),  lse1 = lse(s)
 *   ce = lse1 - s[label]
 *   D  = sum_k p_k log p_k - sum_k p_k (z_k - lse) + m_t (log m_t - (lse_off - lse))  (0 log 0 = 0)
 *   grad_v = k1 r_v + kq q_v - [v not in S] kq m_t exp(z_v - lse_off)   - kq sum_{k: id_k = v} p_k
 *            - k1 [v = label]                        (k1 = mask c_ce, kq = mask c_kl)
 * exactly what sparse.py's torch block computes. Per row: the support's logits are read and set
 * to -inf (a repeat finds -inf there and counts once), pass 1 takes the off-support max (the row
 * comes from memory), pass 2 the off-support sums (from L2), the support's logits go back, and
 * pass 3 writes the gradient over s, off the support as exp(z_v - lse_off) (m_s (k1' + kq) - kq m_t)
 * (m_s = exp(lse_off - lse) <= 1, so nothing overflows however small the off-support mass); the
 * support's entries are then written from their saved logits (a repeat, or a -inf logit, has
 * nothing saved: its first place wrote it, or its 0 stands). */
typedef struct {
    float *s;
    const int64_t *ids;   /* (rows, K) */
    const float *p;       /* (rows, K) teacher weights at T */
    const float *m_t;     /* (rows,) tail masses */
    const int64_t *label; /* (rows,) valid indices */
    const float *mask;    /* (rows,) */
    float *ce, *kl;
    int64_t rows, vocab, ld, K;
    float inv_t, c_ce, c_kl;
    int want_grad;
    int64_t row0, row1;
} sparse_job_t;

static double logaddexp_d(double a, double b) {
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    const double m = a > b ? a : b;
    return m + log(exp(a - m) + exp(b - m));
}

static void *sparse_worker(void *arg) {
    const sparse_job_t *J = (const sparse_job_t *)arg;
    const int64_t V = J->vocab, K = J->K;
    const float inv_t = J->inv_t;
    const int sep_ce = inv_t != 1.0f; /* CE needs its own T = 1 sums */
    float *sk = (float *)malloc(sizeof(float) * (size_t)(K > 0 ? K : 1));
    char *first = (char *)malloc((size_t)(K > 0 ? K : 1));
    if (!sk || !first) { free(sk); free(first); return (void *)1; }
    for (int64_t i = J->row0; i < J->row1; i++) {
        float *s = J->s + i * J->ld;
        const int64_t *ids = J->ids + i * K;
        const float *p = J->p + i * K;
        const float s_lab = s[J->label[i]];
        /* the support: saved, marked -inf (a repeat, or a logit already -inf, counts once) */
        double m_sup = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            const float v = s[ids[k]];
            sk[k] = v;
            first[k] = v != -INFINITY;
            s[ids[k]] = -INFINITY;
            if (first[k] && v > m_sup) m_sup = v;
        }
        /* passes 1 and 2: the off-support max and sums */
        const float m_off = row_max(s, V);
        double zq = 0, z1 = 0;
        if (m_off != -INFINITY) {
            for (int64_t k0 = 0; k0 < V; k0 += BLOCK) {
                const int64_t k1 = k0 + BLOCK < V ? k0 + BLOCK : V;
                float bq = 0, b1 = 0;
                if (sep_ce) {
#pragma omp simd reduction(+ : bq, b1)
                    for (int64_t k = k0; k < k1; k++) {
                        const float a = s[k] - m_off;
                        bq += exp_nonpos(a * inv_t);
                        b1 += exp_nonpos(a);
                    }
                } else {
#pragma omp simd reduction(+ : bq)
                    for (int64_t k = k0; k < k1; k++) bq += exp_nonpos(s[k] - m_off);
                }
                zq += bq; z1 += b1;
            }
        }
        for (int64_t k = 0; k < K; k++) /* a repeat saved -inf: only first places restore */
            if (first[k]) s[ids[k]] = sk[k];
        /* the support's sums, each member once */
        double sq = 0, s1 = 0;
        if (m_sup != -INFINITY) {
            for (int64_t k = 0; k < K; k++) {
                if (!first[k]) continue;
                sq += exp(((double)sk[k] - m_sup) * inv_t);
                if (sep_ce) s1 += exp((double)sk[k] - m_sup);
            }
        }
        const double lse_off = m_off == -INFINITY ? -INFINITY : (double)m_off * inv_t + log(zq);
        const double lse = logaddexp_d(lse_off, m_sup == -INFINITY ? -INFINITY : m_sup * inv_t + log(sq));
        double lse1 = lse;
        if (sep_ce)
            lse1 = logaddexp_d(m_off == -INFINITY ? -INFINITY : (double)m_off + log(z1),
                               m_sup == -INFINITY ? -INFINITY : m_sup + log(s1));
        /* D over the support entries and the tail bucket */
        const double mt = J->m_t[i];
        double d = 0;
        for (int64_t k = 0; k < K; k++) {
            const double pk = p[k];
            if (pk > 0) d += pk * (log(pk) - ((double)sk[k] * inv_t - lse));
        }
        if (mt > 0) d += mt * (log(mt < 1e-38 ? 1e-38 : mt) - (lse_off - lse));
        J->kl[i] = (float)d;
        J->ce[i] = (float)(lse1 - s_lab);
        if (!J->want_grad) continue;
        /* pass 3: the gradient, over s */
        const float mk = J->mask[i];
        const double k1 = mk * (double)J->c_ce, kq = mk * (double)J->c_kl;
        if (lse_off == -INFINITY) {
            /* nothing off the support: every entry is written below */
        } else if (!sep_ce) {
            /* k1 r_v + kq q_v - kq m_t e_off = exp(s_v - lse_off) (m_s (k1 + kq) - kq m_t) */
            const double m_s = exp(lse_off - lse);
            const float c = (float)(m_s * (k1 + kq) - kq * mt);
            const float shift = (float)lse_off;
#pragma omp simd
            for (int64_t k = 0; k < V; k++) s[k] = c * exp_nonpos(s[k] - shift);
        } else {
            const double m_s = exp(lse_off - lse);
            const float c = (float)(m_s * kq - kq * mt);
            const float a1 = (float)k1, sh1 = (float)lse1, shq = (float)lse_off;
#pragma omp simd
            for (int64_t k = 0; k < V; k++) {
                const float sv = s[k];
                s[k] = a1 * exp_nonpos(sv - sh1) + c * exp_nonpos(sv * inv_t - shq);
            }
        }
        for (int64_t k = 0; k < K; k++) { /* the support: k1 r + kq q (a -inf logit keeps its 0) */
            if (!first[k]) continue;
            const double v = sk[k];
            s[ids[k]] = (float)(k1 * exp(v - lse1) + kq * exp(v * inv_t - lse));
        }
        for (int64_t k = 0; k < K; k++) s[ids[k]] -= (float)(kq * p[k]);
        s[J->label[i]] -= (float)k1;
    }
    free(sk);
    free(first);
    return NULL;
}

/* Returns 0 on success, nonzero when a thread's scratch could not be had. */
int distill_sparse_rowstep(float *s, const int64_t *ids, const float *p, const float *m_t,
                           const int64_t *label, const float *mask, float *ce, float *kl,
                           int64_t rows, int64_t vocab, int64_t ld, int64_t K, float inv_t,
                           float c_ce, float c_kl, int want_grad, int threads) {
    threads = clamp_threads(threads, rows);
    sparse_job_t jobs[256];
    for (int w = 0; w < threads; w++) {
        sparse_job_t J = {s, ids, p, m_t, label, mask, ce, kl, rows, vocab, ld, K, inv_t, c_ce, c_kl,
                          want_grad, rows * w / threads, rows * (w + 1) / threads};
        jobs[w] = J;
    }
    return run_jobs(sparse_worker, (char *)jobs, sizeof(sparse_job_t), threads);
}
