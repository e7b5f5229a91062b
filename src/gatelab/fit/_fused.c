/* Fused E-step and sufficient statistics for EM in the softmax-gated Gaussian MoE with
 * experts linear in their parameters (gatelab.fit.em, _SoftmaxLinearKernel).
 *
 * One pass over the data per problem replaces about twenty passes over (B, E, N) arrays:
 * for each sample n, scores s_i = gate_i . z_n, log-components c_i = s_i + log N(y_n |
 * coef_i . f_n, var_i), responsibilities r = softmax(c), gate weights w = softmax(s), and
 * the log-likelihood term logsumexp(c) - logsumexp(s); then the statistics the M-step
 * needs, accumulated on the fly:
 *   S[i]  = sum_n r_ni [f_n f_n^T, f_n y_n, y_n^2]     (Q*Q + Q + 1 numbers)
 *   G[i]  = sum_n (r_ni - w_ni) z_n                      (P)
 *   Hd[i] = sum_n w_ni z_n z_n^T                         (P*P)
 *   Hc[i][j] = sum_n w_ni w_nj z_n z_n^T                 (P*P)
 * G, Hd and Hc only for the free experts i, j < E - 1 (the last is the gate's reference;
 * its entries are left 0).
 * Samples are processed in blocks of NB so that the inner loops run over samples with
 * unit stride and vectorise (exp included: exp_block).
 * The same scores give the log-likelihood's gradient and Hessian in every parameter, for
 * the Newton polish of gatelab.fit.polish (gatelab_loglik_derivs, at the end).
 * Layouts (row-major, contiguous): f (B, Q, N), z (B, P, N), y (B, N), coef (B, E, Q),
 * gate (B, E, P), var (B, E); outputs ll (B), S (B, E, Q*Q+Q+1), G (B, E, P),
 * Hd (B, E, P*P), Hc (B, E, E, P*P).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp of four doubles, to within 1 ulp of libm's for x <= 709 (checked in
 * tests/fit/test_em_fused.py), 0 below -708 (no subnormals; -inf gives 0, NaN stays NaN).
 * glibc's vector exp and log took about 70% of the E-step (2E exps per sample): with this
 * exp inlined and sum_log's one log per 16 samples, the E-step is 2.3x to 2.9x faster. x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite, ln2 in two
 * parts), exp(r) by its Taylor polynomial of degree 13 (truncation below 4e-18 relative),
 * times 2^k built from k's bits. Written with intrinsics because -ffast-math lets gcc
 * reassociate plain arithmetic, which would undo the two-part reduction. Compiled with
 * -DGATELAB_LIBM_EXP, libm's exp is used instead (benchmarks/estep_exp.py). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(GATELAB_LIBM_EXP)
#include <immintrin.h>
static inline __m256d exp4(__m256d x) {
    const __m256d lo = _mm256_set1_pd(-708.0), hi = _mm256_set1_pd(709.0);
    /* max_pd and min_pd return their second operand where one is NaN: x, so NaN stays */
    const __m256d xc = _mm256_min_pd(hi, _mm256_max_pd(lo, x));
    const __m256d k = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(1.4426950408889634)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0x1.62e42fefa39efp-1), xc);
    r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0x1.abc9e3b39803fp-56), r);
    static const double c[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720,
        1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800,
        1.0 / 479001600, 1.0 / 6227020800.0};
    __m256d p = _mm256_set1_pd(c[13]);
    for (int i = 12; i >= 0; i--) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[i]));
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)),
                                                         _mm256_set1_epi64x(1023)), 52);
    const __m256d y = _mm256_mul_pd(p, _mm256_castsi256_pd(e));
    return _mm256_blendv_pd(y, _mm256_setzero_pd(), _mm256_cmp_pd(x, lo, _CMP_LT_OQ));
}
/* a[j] = exp(a[j]) for j < n, in place */
static void exp_block(double *a, int n) {
    int j = 0;
    for (; j + 4 <= n; j += 4) _mm256_storeu_pd(a + j, exp4(_mm256_loadu_pd(a + j)));
    if (j < n) {
        double t[4] = {0.0, 0.0, 0.0, 0.0};
        for (int i = 0; j + i < n; i++) t[i] = a[j + i];
        _mm256_storeu_pd(t, exp4(_mm256_loadu_pd(t)));
        for (int i = 0; j + i < n; i++) a[j + i] = t[i];
    }
}
#else
static void exp_block(double *a, int n) { for (int j = 0; j < n; j++) a[j] = exp(a[j]); }
#endif

/* exp_block, for tests: the kernel's exp against libm's */
void gatelab_exp(int n, double *a) { exp_block(a, n); }

#define NB 256
#define MAXE 16

/* Row 0 of f and of z is the constant 1 (the intercept), so it is read from this block of
 * ones, which stays in cache, instead of from memory. */
static double ONES[NB];
static void init_ones(void) {
    for (int j = 0; j < NB; j++) ONES[j] = 1.0;
}
#define ROW(a, r, N, n0) ((r) == 0 ? ONES : (a) + (size_t)(r) * (N) + (n0))

/* The common case of one covariate and linear experts (f = z = (1, x)): all statistics
 * of an expert in one loop over the block, sharing the loads of r, w, x and y. */
static void line_stats(int E, int nb, const double *x, const double *y, double c[][NB],
                       double s[][NB], double *S, double *G, double *Hd, double *Hc) {
    for (int i = 0; i < E; i++) {
        const double *r = c[i], *w = s[i];
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
        double g0 = 0, g1 = 0, h0 = 0, h1 = 0, h2 = 0;
        for (int j = 0; j < nb; j++) {
            const double rx = r[j] * x[j], ry = r[j] * y[j], d = r[j] - w[j], wx = w[j] * x[j];
            s0 += r[j]; s1 += rx; s2 += rx * x[j]; s3 += ry; s4 += ry * x[j]; s5 += ry * y[j];
            g0 += d; g1 += d * x[j]; h0 += w[j]; h1 += wx; h2 += wx * x[j];
        }
        double *Si = S + i * 7;  /* gram (2 x 2), rhs (2), syy */
        Si[0] += s0; Si[1] += s1; Si[3] += s2; Si[4] += s3; Si[5] += s4; Si[6] += s5;
        if (i == E - 1) continue;
        G[i * 2] += g0; G[i * 2 + 1] += g1;
        Hd[i * 4] += h0; Hd[i * 4 + 1] += h1; Hd[i * 4 + 3] += h2;
        for (int k = i; k < E - 1; k++) {
            const double *wk = s[k];
            double c0 = 0, c1 = 0, c2 = 0;
            for (int j = 0; j < nb; j++) {
                const double ww = w[j] * wk[j], wwx = ww * x[j];
                c0 += ww; c1 += wwx; c2 += wwx * x[j];
            }
            double *Hik = Hc + ((size_t)i * E + k) * 4;
            Hik[0] += c0; Hik[1] += c1; Hik[3] += c2;
        }
    }
}

/* f = z = (1, x): both have two rows and the same second row */
static int is_shared_x(int N, int Q, int P, const double *f, const double *z) {
    return Q == 2 && P == 2 && memcmp(f + N, z + N, sizeof(double) * N) == 0;
}

/* Add one block's statistics, given responsibilities c (becomes r) and gate weights s. */
static void accumulate(int E, int Q, int P, int shared_x, const double *f, const double *z,
                       const double *y, int N, int n0, int nb, double c[][NB], double s[][NB],
                       double *S, double *G, double *Hd, double *Hc) {
    const int SQ = Q * Q + Q + 1, PP = P * P;
    const double *yb = y + n0;
    if (shared_x) {
        line_stats(E, nb, z + N + n0, yb, c, s, S, G, Hd, Hc);
        return;
    }
    for (int i = 0; i < E; i++) {
        const double *r = c[i], *w = s[i];
        double *Si = S + i * SQ;
        for (int q = 0; q < Q; q++) {
            const double *fq = ROW(f, q, N, n0);
            for (int q2 = q; q2 < Q; q2++) {
                const double *fq2 = ROW(f, q2, N, n0);
                double acc = 0.0;
                for (int j = 0; j < nb; j++) acc += r[j] * fq[j] * fq2[j];
                Si[q * Q + q2] += acc;
            }
            double acc = 0.0;
            for (int j = 0; j < nb; j++) acc += r[j] * fq[j] * yb[j];
            Si[Q * Q + q] += acc;
        }
        double acc = 0.0;
        for (int j = 0; j < nb; j++) acc += r[j] * yb[j] * yb[j];
        Si[Q * Q + Q] += acc;
        if (i == E - 1) continue; /* the gate's reference expert has no free rows */
        for (int p = 0; p < P; p++) {
            const double *zp = ROW(z, p, N, n0);
            double g = 0.0;
            for (int j = 0; j < nb; j++) g += (r[j] - w[j]) * zp[j];
            G[i * P + p] += g;
            for (int p2 = p; p2 < P; p2++) {
                const double *zp2 = ROW(z, p2, N, n0);
                double h = 0.0;
                for (int j = 0; j < nb; j++) h += w[j] * zp[j] * zp2[j];
                Hd[i * PP + p * P + p2] += h;
            }
        }
        for (int k = i; k < E - 1; k++) {
            const double *wk = s[k];
            double *Hik = Hc + ((size_t)i * E + k) * PP;
            for (int p = 0; p < P; p++) {
                const double *zp = ROW(z, p, N, n0);
                for (int p2 = p; p2 < P; p2++) {
                    const double *zp2 = ROW(z, p2, N, n0);
                    double h = 0.0;
                    for (int j = 0; j < nb; j++) h += w[j] * wk[j] * zp[j] * zp2[j];
                    Hik[p * P + p2] += h;
                }
            }
        }
    }
}

/* Fill the lower triangles (and Hc's lower blocks) from the upper ones. */
static void fill_lower(int E, int Q, int P, double *S, double *Hd, double *Hc) {
    const int SQ = Q * Q + Q + 1, PP = P * P;
    for (int i = 0; i < E; i++) {
        for (int q = 0; q < Q; q++)
            for (int q2 = 0; q2 < q; q2++) S[i * SQ + q * Q + q2] = S[i * SQ + q2 * Q + q];
        for (int p = 0; p < P; p++)
            for (int p2 = 0; p2 < p; p2++) Hd[i * PP + p * P + p2] = Hd[i * PP + p2 * P + p];
        for (int k = i; k < E - 1; k++) {
            double *Hik = Hc + ((size_t)i * E + k) * PP, *Hki = Hc + ((size_t)k * E + i) * PP;
            for (int p = 0; p < P; p++)
                for (int p2 = 0; p2 < p; p2++) Hik[p * P + p2] = Hik[p2 * P + p];
            if (k != i) memcpy(Hki, Hik, sizeof(double) * PP);
        }
    }
}

/* sum_j log(q_j) with one log per 16 terms: the q_j here are ratios of softmax
 * normalisers, each in [1/E, E] with E <= MAXE = 16, so a product of 16 stays within
 * [2^-64, 2^64], and rounding its 16 factors costs what rounding 16 logs would. */
static double sum_log(const double *q, int n) {
    double total = 0.0;
    for (int j = 0; j < n; j += 16) {
        const int m = n - j < 16 ? n - j : 16;
        double prod = 1.0;
        for (int i = 0; i < m; i++) prod *= q[j + i];
        total += log(prod);
    }
    return total;
}

/* E = 2: in place, c -> responsibilities and s -> gate weights, each a logistic of the
 * difference of its two entries: with e = exp(-|v0 - v1|), the larger entry's share is
 * 1 / (1 + e) and the smaller's e / (1 + e), accurate at both ends, and logsumexp(v) =
 * max(v) + log(1 + e); one exp per pair instead of two.
 * Returns sum_j [logsumexp(c_j) - logsumexp(s_j)]. */
static double two_softmax(int nb, double c[][NB], double s[][NB]) {
    double ec_[NB], es_[NB], ratio[NB], ll = 0.0;
    for (int j = 0; j < nb; j++) {
        ec_[j] = -fabs(c[0][j] - c[1][j]);
        es_[j] = -fabs(s[0][j] - s[1][j]);
    }
    exp_block(ec_, nb);
    exp_block(es_, nb);
    for (int j = 0; j < nb; j++) {
        const double dc = c[0][j] - c[1][j], ds = s[0][j] - s[1][j], ec = ec_[j], es = es_[j];
        const double bc = 1.0 / (1.0 + ec), bs = 1.0 / (1.0 + es);
        ll += fmax(c[0][j], c[1][j]) - fmax(s[0][j], s[1][j]);
        ratio[j] = (1.0 + ec) * bs;
        c[0][j] = dc >= 0.0 ? bc : ec * bc;
        c[1][j] = dc >= 0.0 ? ec * bc : bc;
        s[0][j] = ds >= 0.0 ? bs : es * bs;
        s[1][j] = ds >= 0.0 ? es * bs : bs;
    }
    return ll + sum_log(ratio, nb);
}

/* Log-component and gate scores of one block: s[i][j] = gate_i . z, c[i][j] = s + log N(y |
 * coef_i . f, var_i); with res, also the residuals res[i][j] = y - coef_i . f. */
static void block_scores(int N, int E, int Q, int P, const double *f, const double *z,
                         const double *y, const double *coef, const double *gate,
                         const double *lognorm, const double *half_inv, int n0, int nb,
                         double c[][NB], double s[][NB], double res[][NB]) {
    const double *yb = y + n0;
    for (int i = 0; i < E; i++) {
        double *ci = c[i], *si = s[i];
        for (int j = 0; j < nb; j++) { ci[j] = 0.0; si[j] = 0.0; }
        for (int q = 0; q < Q; q++) {
            const double a = coef[i * Q + q], *fq = ROW(f, q, N, n0);
            for (int j = 0; j < nb; j++) ci[j] += a * fq[j];
        }
        for (int p = 0; p < P; p++) {
            const double g = gate[i * P + p], *zp = ROW(z, p, N, n0);
            for (int j = 0; j < nb; j++) si[j] += g * zp[j];
        }
        if (res)
            for (int j = 0; j < nb; j++) res[i][j] = yb[j] - ci[j];
        for (int j = 0; j < nb; j++) {
            const double d = yb[j] - ci[j];
            ci[j] = si[j] + lognorm[i] - half_inv[i] * d * d;
        }
    }
}

/* In place, c -> responsibilities r = softmax(c) and s -> gate weights w = softmax(s);
 * returns sum_j [logsumexp(c_j) - logsumexp(s_j)], the block's log-likelihood. */
static double block_softmax(int E, int nb, double c[][NB], double s[][NB]) {
    if (E == 2) return two_softmax(nb, c, s);  /* one exp per softmax (a logistic), not two */
    double mc[NB], ms[NB], sc[NB], ss[NB], ratio[NB], block_ll = 0.0;
    for (int j = 0; j < nb; j++) { mc[j] = c[0][j]; ms[j] = s[0][j]; sc[j] = 0.0; ss[j] = 0.0; }
    for (int i = 1; i < E; i++)
        for (int j = 0; j < nb; j++) {
            mc[j] = c[i][j] > mc[j] ? c[i][j] : mc[j];
            ms[j] = s[i][j] > ms[j] ? s[i][j] : ms[j];
        }
    for (int i = 0; i < E; i++) {
        double *ci = c[i], *si = s[i];
        for (int j = 0; j < nb; j++) { ci[j] -= mc[j]; si[j] -= ms[j]; }
        exp_block(ci, nb);
        exp_block(si, nb);
        for (int j = 0; j < nb; j++) { sc[j] += ci[j]; ss[j] += si[j]; }
    }
    for (int j = 0; j < nb; j++) {
        ratio[j] = sc[j] / ss[j];
        block_ll += mc[j] - ms[j];
        sc[j] = 1.0 / sc[j];
        ss[j] = 1.0 / ss[j];
    }
    for (int i = 0; i < E; i++)
        for (int j = 0; j < nb; j++) { c[i][j] *= sc[j]; s[i][j] *= ss[j]; }
    return block_ll + sum_log(ratio, nb);
}

/* -log(2 pi var_i) / 2 and 1 / (2 var_i) */
static void gaussian_terms(int E, const double *var, double *lognorm, double *half_inv) {
    for (int i = 0; i < E; i++) {
        lognorm[i] = -0.5 * log(2.0 * M_PI * var[i]);
        half_inv[i] = 0.5 / var[i];
    }
}

static void one_problem(int N, int E, int Q, int P, int shared_x, const double *f,
                        const double *z, const double *y, const double *coef,
                        const double *gate, const double *var, double *ll, double *S,
                        double *G, double *Hd, double *Hc) {
    const int SQ = Q * Q + Q + 1, PP = P * P;
    double lognorm[MAXE], half_inv[MAXE], c[MAXE][NB], s[MAXE][NB], total = 0.0;
    gaussian_terms(E, var, lognorm, half_inv);
    memset(S, 0, sizeof(double) * E * SQ);
    memset(G, 0, sizeof(double) * E * P);
    memset(Hd, 0, sizeof(double) * E * PP);
    memset(Hc, 0, sizeof(double) * E * E * PP);
    for (int n0 = 0; n0 < N; n0 += NB) {
        const int nb = N - n0 < NB ? N - n0 : NB;
        block_scores(N, E, Q, P, f, z, y, coef, gate, lognorm, half_inv, n0, nb, c, s, NULL);
        total += block_softmax(E, nb, c, s);
        accumulate(E, Q, P, shared_x, f, z, y, N, n0, nb, c, s, S, G, Hd, Hc);
    }
    fill_lower(E, Q, P, S, Hd, Hc);
    *ll = total;
}

int gatelab_estep(int B, int N, int E, int Q, int P, int threads, const double *f,
                  const double *z, const double *y, const double *coef, const double *gate,
                  const double *var, double *ll, double *S, double *G, double *Hd, double *Hc) {
    if (E > MAXE) return 1;
    init_ones();
    const int SQ = Q * Q + Q + 1, PP = P * P;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int b = 0; b < B; b++) {
        const double *fb = f + (size_t)b * Q * N, *zb = z + (size_t)b * P * N;
        one_problem(N, E, Q, P, is_shared_x(N, Q, P, fb, zb), fb, zb, y + (size_t)b * N,
                    coef + (size_t)b * E * Q, gate + (size_t)b * E * P, var + (size_t)b * E,
                    ll + b, S + (size_t)b * E * SQ, G + (size_t)b * E * P,
                    Hd + (size_t)b * E * PP, Hc + (size_t)b * E * E * PP);
    }
    return 0;
}

/* ---- the whole plain EM loop for one problem (same steps as _SoftmaxLinearKernel) ---- */

/* Whether x is finite, read from its bits: the file is compiled with -ffast-math (for
 * glibc's vector exp and log), under which gcc may fold isfinite() to true and treat a
 * NaN compared with 0 as positive; a bit test cannot be folded. */
static inline int finite_bits(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return ((u >> 52) & 0x7ff) != 0x7ff;
}

/* Cholesky solve of the m x m symmetric system a x = b (a is overwritten); 1 if a is
 * not positive definite (a NaN pivot included). */
static int chol_solve(int m, double *a, double *b) {
    for (int j = 0; j < m; j++) {
        double d = a[j * m + j];
        for (int k = 0; k < j; k++) d -= a[j * m + k] * a[j * m + k];
        if (!finite_bits(d) || !(d > 0.0)) return 1;
        d = sqrt(d);
        a[j * m + j] = d;
        for (int i = j + 1; i < m; i++) {
            double v = a[i * m + j];
            for (int k = 0; k < j; k++) v -= a[i * m + k] * a[j * m + k];
            a[i * m + j] = v / d;
        }
    }
    for (int i = 0; i < m; i++) {
        double v = b[i];
        for (int k = 0; k < i; k++) v -= a[i * m + k] * b[k];
        b[i] = v / a[i * m + i];
    }
    for (int i = m - 1; i >= 0; i--) {
        double v = b[i];
        for (int k = i + 1; k < m; k++) v -= a[k * m + i] * b[k];
        b[i] = v / a[i * m + i];
    }
    return 0;
}

typedef struct {
    int N, E, Q, P, shared_x;
    const double *f, *z, *y;
    double floor;
    double *S, *G, *Hd, *Hc; /* statistics of the current parameters */
} Problem;

static void stats_of(Problem *pr, const double *coef, const double *gate, const double *var,
                     double *ll) {
    one_problem(pr->N, pr->E, pr->Q, pr->P, pr->shared_x, pr->f, pr->z, pr->y, coef, gate, var, ll, pr->S,
                pr->G, pr->Hd, pr->Hc);
}

/* Experts by ridge-stabilised weighted least squares and variances in closed form, from
 * S; returns 1 if a variance was floored or an expert (nearly) emptied. */
static int experts_step(Problem *pr, double *coef, double *var, double *work) {
    const int E = pr->E, Q = pr->Q, SQ = Q * Q + Q + 1;
    int low = 0;
    for (int i = 0; i < E; i++) {
        const double *Si = pr->S + i * SQ;
        double *a = work, *c = work + Q * Q, *ci = coef + i * Q;
        double mean_diag = 0.0;
        for (int q = 0; q < Q; q++) mean_diag += Si[q * Q + q];
        const double lam = 1e-10 * (mean_diag / Q + 1.0);
        for (int q = 0; q < Q * Q; q++) a[q] = Si[q];
        for (int q = 0; q < Q; q++) { a[q * Q + q] += lam; c[q] = Si[Q * Q + q] + lam * ci[q]; }
        if (chol_solve(Q, a, c) == 0)
            for (int q = 0; q < Q; q++) ci[q] = c[q];
        double rss = Si[Q * Q + Q];
        for (int q = 0; q < Q; q++) {
            rss -= 2.0 * ci[q] * Si[Q * Q + q];
            for (int q2 = 0; q2 < Q; q2++) rss += ci[q] * Si[q * Q + q2] * ci[q2];
        }
        const double nk = Si[0];
        double v = nk > 1e-10 ? (rss > 0.0 ? rss : 0.0) / (nk > 1e-300 ? nk : 1e-300) : var[i];
        if (v < pr->floor || nk < 1.0) low = 1;
        var[i] = v > pr->floor ? v : pr->floor;
    }
    return low;
}

/* Newton/IRLS direction for the free experts' gate rows (all but the last): solves
 * (-H + r scale I) d = g, scale = mean |diag(-H)|, with the first ridge r of 1e-10, 1e-6,
 * 1e-2, 1e2 for which Cholesky succeeds; d = 0 if none does. The rule of
 * gatelab.fit.newton.ridged_direction (SOFTMAX_RIDGES), which the PyTorch kernel uses. */
static void gate_direction(Problem *pr, double *d, double *work) {
    const int E = pr->E, P = pr->P, PP = P * P, m = (E - 1) * P;
    double *a = work;
    for (int i = 0; i < E - 1; i++)
        for (int p = 0; p < P; p++) {
            d[i * P + p] = pr->G[i * P + p];
            for (int j = 0; j < E - 1; j++)
                for (int q = 0; q < P; q++) {
                    double v = -pr->Hc[((size_t)i * E + j) * PP + p * P + q];
                    if (i == j) v += pr->Hd[i * PP + p * P + q];
                    a[(i * P + p) * m + j * P + q] = v;
                }
        }
    double scale = 0.0;
    for (int k = 0; k < m; k++) scale += fabs(a[k * m + k]);
    scale = scale / m > 1e-300 ? scale / m : 1e-300;
    double *a2 = work + m * m, *g = work + 2 * m * m;
    for (double ridge = 1e-10; ridge < 1e3; ridge *= 1e4) {
        for (int k = 0; k < m * m; k++) a2[k] = a[k];
        for (int k = 0; k < m; k++) { a2[k * m + k] += ridge * scale; g[k] = d[k]; }
        if (chol_solve(m, a2, g) == 0) {
            for (int k = 0; k < m; k++) d[k] = g[k];
            return;
        }
    }
    for (int k = 0; k < m; k++) d[k] = 0.0;
}

/* gate + t d on the free rows; t = 0 is the gate itself (0 * NaN would not be). */
static void step_gate(int E, int P, const double *gate, const double *d, double t, double *out) {
    for (int k = 0; k < E * P; k++) out[k] = gate[k];
    if (t == 0.0) return;
    for (int k = 0; k < (E - 1) * P; k++) out[k] += t * d[k];
}

/* One EM update from (coef, gate, var) whose statistics are in pr and log-likelihood is
 * *ll; writes the new parameters, statistics and log-likelihood in place. */
static int em_update(Problem *pr, double *coef, double *gate, double *var, double *ll,
                     double *work) {
    const int E = pr->E, P = pr->P;
    int low = experts_step(pr, coef, var, work);
    double ll_new;
    if (E == 1) {
        stats_of(pr, coef, gate, var, &ll_new);
        *ll = ll_new;
        return low;
    }
    const int m = (E - 1) * P;
    double *d = work, *cand = work + m, *scratch = work + m + E * P;
    gate_direction(pr, d, scratch);
    const double ll0 = *ll;
    for (int h = 0; h <= 11; h++) {  /* t = 1, 1/2, ..., 1/1024, then 0 */
        const double t = h == 11 ? 0.0 : ldexp(1.0, -h);
        step_gate(E, P, gate, d, t, cand);
        stats_of(pr, coef, cand, var, &ll_new);
        if (ll_new >= ll0 - 1e-12 * fabs(ll0) || h == 11) break;
    }
    for (int k = 0; k < E * P; k++) gate[k] = cand[k];
    *ll = ll_new;
    return low;
}

/* Problem b of a batch, with one buffer for its statistics (pr->S first) and, after them,
 * the work space of the M-step, which is returned. Free with free(pr->S). */
static double *open_problem(Problem *pr, int b, int N, int E, int Q, int P, const double *f,
                            const double *z, const double *y, const double *floor) {
    const int SQ = Q * Q + Q + 1, PP = P * P, m = (E - 1) * P;
    const size_t stats = (size_t)E * SQ + E * P + E * PP + (size_t)E * E * PP;
    const size_t work = 3 * (size_t)m * m + 2 * m + E * P + 2 * Q * Q + 2 * Q + 16;
    double *buf = malloc(sizeof(double) * (stats + work));
    if (!buf) return NULL;
    const double *fb = f + (size_t)b * Q * N, *zb = z + (size_t)b * P * N;
    Problem p = {N, E, Q, P, is_shared_x(N, Q, P, fb, zb), fb, zb, y + (size_t)b * N, floor[b],
                 buf, buf + E * SQ, buf + E * SQ + E * P, buf + E * SQ + E * P + E * PP};
    *pr = p;
    return buf + stats;
}

int gatelab_em(int B, int N, int E, int Q, int P, int threads, const double *f,
               const double *z, const double *y, const double *floor, double tol, int max_iter,
               double *coef, double *gate, double *var, double *ll, int *n_iter,
               int *converged, int *degenerate) {
    if (E > MAXE) return 1;
    init_ones();
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(|| : failed)
    for (int b = 0; b < B; b++) {
        Problem pr;
        double *w = open_problem(&pr, b, N, E, Q, P, f, z, y, floor);
        if (!w) {  /* out of memory: the caller raises MemoryError */
            failed = 1;
            continue;
        }
        double *cb = coef + (size_t)b * E * Q, *gb = gate + (size_t)b * E * P,
               *vb = var + (size_t)b * E;
        double cur;
        stats_of(&pr, cb, gb, vb, &cur);
        int it = 0, done = 0, low = 0;
        while (it < max_iter && !done) {
            const double before = cur;
            low |= em_update(&pr, cb, gb, vb, &cur, w);
            it++;
            done = fabs(cur - before) <= tol * fabs(before);
        }
        ll[b] = cur;
        n_iter[b] = it;
        converged[b] = done;
        degenerate[b] = low;
        free(pr.S);  /* the start of the problem's buffer */
    }
    return failed ? 3 : 0;
}

/* ---- one M-step from given responsibilities (gatelab.fit.init.from_responsibilities) ---- */

/* Gate scores of one block, s[i][j] = gate_i . z_(n0 + j), then in place their softmax
 * over i; lse[j] gets the log-normaliser. */
static void block_gate_softmax(const Problem *pr, const double *gate, int n0, int nb,
                               double s[][NB], double *lse, double *raw_fit,
                               const double *resp) {
    const int N = pr->N, E = pr->E, P = pr->P;
    double top[NB], tot[NB];
    for (int i = 0; i < E; i++) {
        double *si = s[i];
        for (int j = 0; j < nb; j++) si[j] = 0.0;
        for (int p = 0; p < P; p++) {
            const double g = gate[i * P + p], *zp = ROW(pr->z, p, N, n0);
            for (int j = 0; j < nb; j++) si[j] += g * zp[j];
        }
    }
    if (raw_fit) {  /* sum_j sum_i r_ji s_ij, before s is overwritten */
        double fit = 0.0;
        for (int i = 0; i < E; i++)
            for (int j = 0; j < nb; j++) fit += resp[(size_t)(n0 + j) * E + i] * s[i][j];
        *raw_fit = fit;
    }
    for (int j = 0; j < nb; j++) { top[j] = s[0][j]; tot[j] = 0.0; }
    for (int i = 1; i < E; i++)
        for (int j = 0; j < nb; j++) top[j] = s[i][j] > top[j] ? s[i][j] : top[j];
    for (int i = 0; i < E; i++)
        for (int j = 0; j < nb; j++) s[i][j] -= top[j];
    for (int i = 0; i < E; i++) {
        exp_block(s[i], nb);
        for (int j = 0; j < nb; j++) tot[j] += s[i][j];
    }
    for (int j = 0; j < nb; j++) { lse[j] = top[j] + log(tot[j]); tot[j] = 1.0 / tot[j]; }
    for (int i = 0; i < E; i++)
        for (int j = 0; j < nb; j++) s[i][j] *= tot[j];
}

/* sum_n [sum_i r_ni s_ni - (sum_i r_ni) logsumexp_i s_ni], s_ni = gate_i . z_n: the
 * softmax gate's part of Q; resp is (N, E). Finite by construction: the scores are
 * finite (the ridge keeps Newton directions finite) and lse subtracts the maximum. */
static double gate_q(const Problem *pr, const double *resp, const double *gate) {
    const int N = pr->N, E = pr->E;
    double s[MAXE][NB], lse[NB], q = 0.0;
    for (int n0 = 0; n0 < N; n0 += NB) {
        const int nb = N - n0 < NB ? N - n0 : NB;
        double fit;
        block_gate_softmax(pr, gate, n0, nb, s, lse, &fit, resp);
        q += fit;
        for (int j = 0; j < nb; j++) {
            double rsum = 0.0;
            for (int i = 0; i < E; i++) rsum += resp[(size_t)(n0 + j) * E + i];
            q -= rsum * lse[j];
        }
    }
    return q;
}

/* The statistics S, G, Hd, Hc of one_problem, but with the responsibilities given. */
static void stats_from_resp(Problem *pr, const double *resp, const double *gate) {
    const int N = pr->N, E = pr->E, Q = pr->Q, P = pr->P, SQ = Q * Q + Q + 1, PP = P * P;
    memset(pr->S, 0, sizeof(double) * E * SQ);
    memset(pr->G, 0, sizeof(double) * E * P);
    memset(pr->Hd, 0, sizeof(double) * E * PP);
    memset(pr->Hc, 0, sizeof(double) * E * E * PP);
    double c[MAXE][NB], s[MAXE][NB], lse[NB];
    for (int n0 = 0; n0 < N; n0 += NB) {
        const int nb = N - n0 < NB ? N - n0 : NB;
        for (int i = 0; i < E; i++)
            for (int j = 0; j < nb; j++) c[i][j] = resp[(size_t)(n0 + j) * E + i];
        block_gate_softmax(pr, gate, n0, nb, s, lse, NULL, NULL);
        accumulate(E, Q, P, pr->shared_x, pr->f, pr->z, pr->y, N, n0, nb, c, s, pr->S, pr->G,
                   pr->Hd, pr->Hc);
    }
    fill_lower(E, Q, P, pr->S, pr->Hd, pr->Hc);
}

/* gate_direction for B problems' statistics G (B, E, P), Hd (B, E, P, P), Hc (B, E, E, P, P);
 * d (B, E - 1, P). For tests: the C and PyTorch rules must agree. */
int gatelab_gate_direction(int B, int E, int P, const double *G, const double *Hd,
                           const double *Hc, double *d) {
    const int m = (E - 1) * P;
    double *work = malloc(sizeof(double) * (size_t)(2 * m * m + m));
    if (!work) return 2;
    for (int b = 0; b < B; b++) {
        Problem pr;
        pr.E = E;
        pr.P = P;
        pr.G = (double *)G + (size_t)b * E * P;
        pr.Hd = (double *)Hd + (size_t)b * E * P * P;
        pr.Hc = (double *)Hc + (size_t)b * E * E * P * P;
        gate_direction(&pr, d + (size_t)b * m, work);
    }
    free(work);
    return 0;
}

int gatelab_mstep(int B, int N, int E, int Q, int P, int threads, const double *f,
                  const double *z, const double *y, const double *resp, const double *floor,
                  double *coef, double *gate, double *var, int *degenerate) {
    if (E > MAXE) return 1;
    init_ones();
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(|| : failed)
    for (int b = 0; b < B; b++) {
        Problem pr;
        double *w = open_problem(&pr, b, N, E, Q, P, f, z, y, floor);
        if (!w) {  /* out of memory: the caller raises MemoryError */
            failed = 1;
            continue;
        }
        double *cb = coef + (size_t)b * E * Q, *gb = gate + (size_t)b * E * P,
               *vb = var + (size_t)b * E;
        const double *rb = resp + (size_t)b * N * E;
        stats_from_resp(&pr, rb, gb);
        degenerate[b] = experts_step(&pr, cb, vb, w);
        if (E > 1) {  /* one Newton step with halving on Q (1, 1/2, ..., 1/2048), as halving_step */
            const int m = (E - 1) * P;
            double *d = w, *cand = w + m, *scratch = w + m + E * P;
            gate_direction(&pr, d, scratch);
            const double q0 = gate_q(&pr, rb, gb);
            for (int h = 0; h < 12; h++) {
                step_gate(E, P, gb, d, ldexp(1.0, -h), cand);
                const double qv = gate_q(&pr, rb, cand);
                if (finite_bits(qv) && qv >= q0) {
                    for (int k = 0; k < E * P; k++) gb[k] = cand[k];
                    break;
                }
            }
        }
        free(pr.S);  /* the start of the problem's buffer */
    }
    return failed ? 3 : 0;
}

/* ---- log-likelihood, gradient and Hessian in every parameter (gatelab.fit.polish) ---- */

/* Per sample, in the scores s_i, means m_i and log variances L_i (expert i), with r =
 * softmax(u), u_i = log w_i + log N(y | m_i, v_i), w = softmax(s), e_i = (y - m_i) / v_i,
 * h_i = (y - m_i)^2 / (2 v_i) - 1/2, and t = (r, r e, r h) over (s, m, L):
 *   gradient  (r - w, r e, r h),
 *   Hessian   D + w~ w~^T - t t^T, where w~ = (w, 0, 0) and D is block-diagonal by expert,
 *             D_i over (s_i, m_i, L_i) = [[r - w, r e, r h], [r e, r (e^2 - 1/v), r e (h - 1)],
 *                                          [r h, r e (h - 1), r (h^2 - h - 1/2)]]  (all _i).
 * (the same quantities as fit.polish._softmax_linear_derivatives, there as A^T (diag r -
 * r r^T) A + sum_i r_i d2u_i). Each coordinate is linear in its parameters through a
 * feature phi: z for s_i (gate_i), f for m_i (coef_i), 1 for L_i, so the parameter
 * Hessian is sum_n J^T (D + w~ w~^T - t t^T) J: with T_a = t phi_a and W_a = w~ phi_a per
 * parameter a, H_ab = sum_n [D phi_a phi_b (same expert) + W_a W_b - T_a T_b].
 * Parameters of expert i sit at i W, W = P + Q + 1: gate (P), coef (Q), log var (1). */
typedef struct {
    int kind, expert;  /* kind 0: gate entry, 1: coefficient, 2: log variance */
    int row;           /* its row of z or f (kind 2: none) */
} Param;

enum { KIND_GATE, KIND_COEF, KIND_LOGVAR };

static void derivs_problem(int N, int E, int Q, int P, const double *f, const double *z,
                           const double *y, const double *coef, const double *gate,
                           const double *var, int want, double *ll, double *grad,
                           double *hess, double *work) {
    const int W = P + Q + 1, M = E * W;
    double lognorm[MAXE], half_inv[MAXE], c[MAXE][NB], s[MAXE][NB], res[MAXE][NB];
    double *T = work, *Wt = T + (size_t)M * NB, *D = Wt + (size_t)M * NB;  /* D: 4 per expert */
    Param par[MAXE * 64];
    for (int a = 0; a < M; a++) {
        const int i = a / W, k = a % W;
        par[a].expert = i;
        par[a].kind = k < P ? KIND_GATE : (k < P + Q ? KIND_COEF : KIND_LOGVAR);
        par[a].row = k < P ? k : k - P;
    }
    gaussian_terms(E, var, lognorm, half_inv);
    double total = 0.0;
    if (want) {
        memset(grad, 0, sizeof(double) * M);
        memset(hess, 0, sizeof(double) * M * M);
    }
    for (int n0 = 0; n0 < N; n0 += NB) {
        const int nb = N - n0 < NB ? N - n0 : NB;
        block_scores(N, E, Q, P, f, z, y, coef, gate, lognorm, half_inv, n0, nb, c, s, res);
        total += block_softmax(E, nb, c, s);
        if (!want) continue;
        /* Expert i's D rows: r - w, r (e^2 - 1/v), r e (h - 1), r (h^2 - h - 1/2); then res
         * becomes e and c becomes r h (r itself is dsw + w). */
        for (int i = 0; i < E; i++) {
            double *dsw = D + (size_t)(4 * i) * NB, *dmm = dsw + NB, *dml = dmm + NB, *dll = dml + NB;
            const double inv = 1.0 / var[i];
            for (int j = 0; j < nb; j++) {
                const double r = c[i][j], e = res[i][j] * inv;
                const double h = res[i][j] * res[i][j] * half_inv[i] - 0.5;
                dsw[j] = r - s[i][j];
                dmm[j] = r * (e * e - inv);
                dml[j] = r * e * (h - 1.0);
                dll[j] = r * (h * h - h - 0.5);
                res[i][j] = e;
                c[i][j] = r * h;
            }
        }
        for (int a = 0; a < M; a++) {  /* T_a = t phi_a, W_a = w~ phi_a, gradient */
            const Param pa = par[a];
            const int i = pa.expert;
            const double *phi = pa.kind == KIND_GATE ? ROW(z, pa.row, N, n0)
                              : pa.kind == KIND_COEF ? ROW(f, pa.row, N, n0) : ONES;
            const double *dsw = D + (size_t)(4 * i) * NB;
            double *ta = T + (size_t)a * NB, *wa = Wt + (size_t)a * NB, g = 0.0;
            for (int j = 0; j < nb; j++) {
                const double r = dsw[j] + s[i][j];
                const double t = pa.kind == KIND_GATE ? r : (pa.kind == KIND_COEF ? r * res[i][j] : c[i][j]);
                const double gz = pa.kind == KIND_GATE ? dsw[j] : t;
                ta[j] = t * phi[j];
                wa[j] = pa.kind == KIND_GATE ? s[i][j] * phi[j] : 0.0;
                g += gz * phi[j];
            }
            grad[a] += g;
        }
        for (int a = 0; a < M; a++) {
            const Param pa = par[a];
            const double *ta = T + (size_t)a * NB, *wa = Wt + (size_t)a * NB;
            const double *phia = pa.kind == KIND_GATE ? ROW(z, pa.row, N, n0)
                               : pa.kind == KIND_COEF ? ROW(f, pa.row, N, n0) : ONES;
            for (int b = a; b < M; b++) {
                const Param pb = par[b];
                const double *tb = T + (size_t)b * NB, *wb = Wt + (size_t)b * NB;
                double acc = 0.0;
                for (int j = 0; j < nb; j++) acc -= ta[j] * tb[j];
                if (pa.kind == KIND_GATE && pb.kind == KIND_GATE)
                    for (int j = 0; j < nb; j++) acc += wa[j] * wb[j];
                if (pa.expert == pb.expert) {
                    const int i = pa.expert;
                    const double *phib = pb.kind == KIND_GATE ? ROW(z, pb.row, N, n0)
                                       : pb.kind == KIND_COEF ? ROW(f, pb.row, N, n0) : ONES;
                    const double *dsw = D + (size_t)(4 * i) * NB;
                    /* D's entry for the pair of kinds (pa.kind <= pb.kind by the layout) */
                    const int key = pa.kind * 3 + pb.kind;
                    if (key == KIND_GATE * 3 + KIND_GATE)
                        for (int j = 0; j < nb; j++) acc += dsw[j] * phia[j] * phib[j];
                    else if (key == KIND_GATE * 3 + KIND_COEF)
                        for (int j = 0; j < nb; j++)
                            acc += (dsw[j] + s[i][j]) * res[i][j] * phia[j] * phib[j];
                    else if (key == KIND_GATE * 3 + KIND_LOGVAR)
                        for (int j = 0; j < nb; j++) acc += c[i][j] * phia[j] * phib[j];
                    else if (key == KIND_COEF * 3 + KIND_COEF)
                        for (int j = 0; j < nb; j++) acc += dsw[NB + j] * phia[j] * phib[j];
                    else if (key == KIND_COEF * 3 + KIND_LOGVAR)
                        for (int j = 0; j < nb; j++) acc += dsw[2 * NB + j] * phia[j] * phib[j];
                    else
                        for (int j = 0; j < nb; j++) acc += dsw[3 * NB + j];
                }
                hess[a * M + b] += acc;
            }
        }
    }
    if (want)
        for (int a = 0; a < M; a++)
            for (int b = 0; b < a; b++) hess[a * M + b] = hess[b * M + a];
    *ll = total;
}

/* ll (B); with want, grad (B, M) and hess (B, M, M), M = E (P + Q + 1), in the layout of
 * derivs_problem. Sums over the samples, not means. */
int gatelab_loglik_derivs(int B, int N, int E, int Q, int P, int threads, const double *f,
                          const double *z, const double *y, const double *coef,
                          const double *gate, const double *var, int want, double *ll,
                          double *grad, double *hess) {
    const int W = P + Q + 1, M = E * W;
    if (E > MAXE || W > 64) return 1;
    init_ones();
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(|| : failed)
    for (int b = 0; b < B; b++) {
        double *work = want ? malloc(sizeof(double) * ((size_t)2 * M + 4 * E) * NB) : NULL;
        if (want && !work) {
            failed = 1;
            continue;
        }
        derivs_problem(N, E, Q, P, f + (size_t)b * Q * N, z + (size_t)b * P * N, y + (size_t)b * N,
                       coef + (size_t)b * E * Q, gate + (size_t)b * E * P, var + (size_t)b * E,
                       want, ll + b, want ? grad + (size_t)b * M : NULL,
                       want ? hess + (size_t)b * M * M : NULL, work);
        free(work);
    }
    return failed ? 3 : 0;
}
