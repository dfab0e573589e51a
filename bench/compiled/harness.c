/*
 * The compiled-trees peer's harness: one tree ensemble compiled by tl2cgen (its main.c and
 * header.h, built into this program), called one row at a time, as lathe-bench calls Lathe
 * and onnxruntime.
 *
 *   harness time ROWS MODE SECONDS   prints the mean seconds per call
 *       MODE repeat: the first row again and again;
 *            cycle:  every row of ROWS in turn;
 *            batch:  the first 256 rows in turn; one call is the 256 rows.
 *   harness check ROWS EXPECTED      exits 1 unless every output is within 1e-5 of EXPECTED
 *
 * ROWS: two little-endian uint32 (rows, features), then rows x features float32 (NaN for a
 * missing value). EXPECTED: rows x outputs float32. A call converts the row to tl2cgen's
 * entries (NaN as missing), clears the outputs and predicts with the model's post-transform:
 * the whole of what a caller does per row.
 */
#define _POSIX_C_SOURCE 199309L
#include "header.h"
#include <time.h>

#define OUTPUTS (N_TARGET * MAX_N_CLASS)
#define BATCH 256

static float *rows;
static uint32_t n_rows, width;
static union Entry *entry;
static float result[OUTPUTS];
static volatile float sink;

static void call(const float *row) {
    for (uint32_t i = 0; i < width; i++) {
        if (isnan(row[i])) {
            entry[i].missing = -1;
        } else {
            entry[i].fvalue = row[i];
        }
    }
    memset(result, 0, sizeof result);
    predict(entry, 0, result);
    sink += result[0];
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "harness: cannot open %s\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "harness: cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void load_rows(const char *path) {
    size_t len;
    unsigned char *buf = read_all(path, &len);
    if (len < 8) {
        fprintf(stderr, "harness: %s: no header\n", path);
        exit(2);
    }
    memcpy(&n_rows, buf, 4);
    memcpy(&width, buf + 4, 4);
    if (n_rows == 0 || (int32_t)width != get_num_feature() || len != 8 + (size_t)n_rows * width * 4) {
        fprintf(stderr, "harness: %s: %u rows of %u features in %zu bytes; the model takes %d features\n",
                path, n_rows, width, len, get_num_feature());
        exit(2);
    }
    rows = (float *)(buf + 8);
    entry = calloc(width, sizeof *entry);
}

/* Calls in blocks that double until a block takes a millisecond, so reading the clock costs
 * nothing measurable; then blocks until the budget is spent. Seconds per call. */
static double timed(const char *mode, double budget) {
    uint32_t next = 0;
    long block = 1, calls = 0;
    int repeat = !strcmp(mode, "repeat"), cycle = !strcmp(mode, "cycle"), batch = !strcmp(mode, "batch");
    if (!repeat && !cycle && !batch) {
        fprintf(stderr, "harness: unknown mode %s (repeat, cycle or batch)\n", mode);
        exit(2);
    }
    uint32_t batch_rows = n_rows < BATCH ? n_rows : BATCH;
    /* Untimed first: the code and the rows paged in and cached, as for the engines that
     * lathe-bench warms up in its own process. */
    for (uint32_t r = 0; r < n_rows; r++) call(rows + (size_t)r * width);
    double start = now(), elapsed = 0;
    while (elapsed < budget || calls < 10) {
        double t0 = now();
        for (long k = 0; k < block; k++) {
            if (repeat) {
                call(rows);
            } else if (cycle) {
                call(rows + (size_t)next * width);
                next = next + 1 == n_rows ? 0 : next + 1;
            } else {
                for (uint32_t r = 0; r < BATCH; r++) call(rows + (size_t)(r % batch_rows) * width);
            }
        }
        calls += block;
        double t1 = now();
        if (t1 - t0 < 1e-3) block *= 2;
        elapsed = t1 - start;
    }
    return elapsed / (double)calls;
}

static int check(const char *expected_path) {
    size_t len;
    float *want = read_all(expected_path, &len);
    if (len != (size_t)n_rows * OUTPUTS * 4) {
        fprintf(stderr, "harness: %s holds %zu bytes, not %u rows of %d outputs\n", expected_path, len,
                n_rows, OUTPUTS);
        return 2;
    }
    for (uint32_t r = 0; r < n_rows; r++) {
        call(rows + (size_t)r * width);
        for (int o = 0; o < OUTPUTS; o++) {
            float w = want[(size_t)r * OUTPUTS + o], g = result[o];
            float scale = fabsf(w) > 1.0f ? fabsf(w) : 1.0f;
            if ((isnan(w) != isnan(g)) || (!isnan(w) && fabsf(g - w) / scale > 1e-5f)) {
                fprintf(stderr, "harness: row %u output %d: %g, expected %g\n", r, o, g, w);
                return 1;
            }
        }
    }
    printf("%u rows match\n", n_rows);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "time")) {
        load_rows(argv[2]);
        printf("%.9e\n", timed(argv[3], atof(argv[4])));
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "check")) {
        load_rows(argv[2]);
        return check(argv[3]);
    }
    fprintf(stderr, "usage: harness time ROWS repeat|cycle|batch SECONDS | harness check ROWS EXPECTED\n");
    return 2;
}
