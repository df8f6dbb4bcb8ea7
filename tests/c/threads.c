/*
 * C API test: one handle shared by 8 threads writing 512-byte sectors, both
 * interleaved (neighbouring sectors, and so the same new clusters, belong to
 * different threads) and in disjoint areas, reading their own sectors back while the
 * others write; then everything is verified, `qemu-img check` must be clean and
 * `qemu-img compare` must agree. Also checks that cowdisk_last_error() is per thread.
 */
#include <pthread.h>

#include "testutil.h"

#define NTHREADS 8
#define SECTOR 512u
#define DISK_SIZE (8ull << 20)
/* Interleaved area: sectors [0, 2048) (1 MiB); sector s belongs to thread s % 8. */
#define INTERLEAVED_SECTORS 2048u
/* Disjoint area: from 2 MiB, each thread owns 256 KiB (512 sectors) in a row. */
#define DISJOINT_START (2u << 20)
#define DISJOINT_SECTORS_PER_THREAD 512u
/* Unaligned area: from 6 MiB, thread t writes 700-byte records at t*700 + k*5600. */
#define UNALIGNED_START (6u << 20)
#define RECORD 700u
#define RECORDS_PER_THREAD 150u

static unsigned char *model;
static cowdisk *shared_img;

struct job {
    int thread;
    int pass; /* 0: first writes (allocating), 1: rewrite with rotated ownership */
    unsigned seed;
};

static void fill_sector(unsigned char *buf, size_t len, uint64_t offset, int pass, int thread) {
    for (size_t i = 0; i < len; i++) {
        uint64_t x = offset + i;
        buf[i] = (unsigned char)(x * 37u + (x >> 9) * 101u + (unsigned)pass * 53u +
                                 (unsigned)thread * 17u + 3u);
    }
    if (len >= 16) {
        /* A readable tag at the start: offset, pass and thread. */
        memcpy(buf, &offset, 8);
        buf[8] = (unsigned char)pass;
        buf[9] = (unsigned char)thread;
    }
}

static void shuffle(uint64_t *v, size_t n, unsigned *seed) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)rand_r(seed) % i;
        uint64_t t = v[i - 1];
        v[i - 1] = v[j];
        v[j] = t;
    }
}

/* Writes one piece, records it in the model (each byte has exactly one writer per
 * pass, so the model needs no lock) and reads it straight back. */
static void write_piece(int thread, int pass, uint64_t offset, size_t len) {
    unsigned char buf[RECORD > SECTOR ? RECORD : SECTOR];
    unsigned char back[sizeof buf];
    fill_sector(buf, len, offset, pass, thread);
    int rc = cowdisk_pwrite(shared_img, buf, len, offset);
    if (rc != 0)
        FAIL("thread %d: pwrite(%zu bytes at %llu) returned %d (%s): %s", thread, len,
             (unsigned long long)offset, rc, cowdisk_strerror(rc), cowdisk_last_error());
    memcpy(model + offset, buf, len);
    rc = cowdisk_pread(shared_img, back, len, offset);
    if (rc != 0)
        FAIL("thread %d: pread(%zu bytes at %llu) returned %d (%s): %s", thread, len,
             (unsigned long long)offset, rc, cowdisk_strerror(rc), cowdisk_last_error());
    long long d = tu_first_diff(back, buf, len);
    if (d >= 0)
        FAIL("thread %d: reading back its own write at %llu: byte %lld is 0x%02x, "
             "expected 0x%02x",
             thread, (unsigned long long)offset, d, back[d], buf[d]);
}

static void *writer(void *arg) {
    struct job *job = arg;
    int t = job->thread;
    /* Ownership rotates on the second pass, so every thread rewrites others' data. */
    int owner = (t + job->pass) % NTHREADS;
    unsigned seed = job->seed;

    size_t n = INTERLEAVED_SECTORS / NTHREADS + DISJOINT_SECTORS_PER_THREAD + RECORDS_PER_THREAD;
    uint64_t *offsets = malloc(n * sizeof *offsets);
    size_t *lengths = malloc(n * sizeof *lengths);
    if (offsets == NULL || lengths == NULL)
        FAIL("out of memory");
    size_t k = 0;
    for (uint64_t s = (uint64_t)owner; s < INTERLEAVED_SECTORS; s += NTHREADS)
        offsets[k++] = s * SECTOR;
    for (uint64_t s = 0; s < DISJOINT_SECTORS_PER_THREAD; s++)
        offsets[k++] =
            DISJOINT_START + ((uint64_t)owner * DISJOINT_SECTORS_PER_THREAD + s) * SECTOR;
    for (uint64_t r = 0; r < RECORDS_PER_THREAD; r++)
        offsets[k++] = UNALIGNED_START + (r * NTHREADS + (uint64_t)owner) * RECORD;
    if (k != n)
        FAIL("internal test error: %zu pieces, expected %zu", k, n);
    shuffle(offsets, n, &seed);
    for (size_t i = 0; i < n; i++)
        lengths[i] = offsets[i] >= UNALIGNED_START ? RECORD : SECTOR;

    for (size_t i = 0; i < n; i++) {
        write_piece(t, job->pass, offsets[i], lengths[i]);
        if (i % 97 == 0) {
            int rc = cowdisk_flush(shared_img);
            if (rc != 0)
                FAIL("thread %d: flush returned %d: %s", t, rc, cowdisk_last_error());
        }
    }

    /* A failure on this thread sets this thread's message only. */
    unsigned char b[4];
    int rc = cowdisk_pread(shared_img, b, sizeof b, DISK_SIZE);
    if (rc != -EINVAL)
        FAIL("thread %d: out-of-range pread returned %d, expected -EINVAL", t, rc);
    if (cowdisk_last_error()[0] == '\0')
        FAIL("thread %d: cowdisk_last_error() is empty after a failure", t);

    free(offsets);
    free(lengths);
    return NULL;
}

/* Reads a share of the disk in 4 KiB + 1 pieces and compares with the model. */
struct reader_job {
    int thread;
};

static void *reader(void *arg) {
    struct reader_job *job = arg;
    const size_t piece = 4097;
    unsigned char *buf = malloc(piece);
    if (buf == NULL)
        FAIL("out of memory");
    for (uint64_t off = (uint64_t)job->thread * piece; off < DISK_SIZE;
         off += (uint64_t)NTHREADS * piece) {
        size_t len = DISK_SIZE - off < piece ? (size_t)(DISK_SIZE - off) : piece;
        int rc = cowdisk_pread(shared_img, buf, len, off);
        if (rc != 0)
            FAIL("reader %d: pread(%zu at %llu) returned %d: %s", job->thread, len,
                 (unsigned long long)off, rc, cowdisk_last_error());
        long long d = tu_first_diff(buf, model + off, len);
        if (d >= 0)
            FAIL("reader %d: byte at %llu is 0x%02x, expected 0x%02x", job->thread,
                 (unsigned long long)(off + (uint64_t)d), buf[d], model[off + (uint64_t)d]);
    }
    free(buf);
    return NULL;
}

static void verify_disk(cowdisk *img, const char *what) {
    const size_t chunk = 1u << 20;
    unsigned char *buf = malloc(chunk);
    if (buf == NULL)
        FAIL("out of memory");
    for (uint64_t off = 0; off < DISK_SIZE; off += chunk) {
        int rc = cowdisk_pread(img, buf, chunk, off);
        if (rc != 0)
            FAIL("%s: pread at %llu returned %d: %s", what, (unsigned long long)off, rc,
                 cowdisk_last_error());
        long long d = tu_first_diff(buf, model + off, chunk);
        if (d >= 0) {
            uint64_t bad = off + (uint64_t)d;
            uint64_t sector = bad & ~(uint64_t)(SECTOR - 1);
            FAIL("%s: byte at %llu (sector %llu, tagged pass %u thread %u) is 0x%02x, "
                 "expected 0x%02x",
                 what, (unsigned long long)bad, (unsigned long long)(sector / SECTOR),
                 buf[sector - off + 8], buf[sector - off + 9], buf[d], model[bad]);
        }
    }
    free(buf);
    tu_checks++;
    printf("ok   %s\n", what);
}

static void run_threads(void *(*fn)(void *), void *jobs, size_t job_size, const char *what) {
    pthread_t tids[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        int err = pthread_create(&tids[t], NULL, fn, (char *)jobs + (size_t)t * job_size);
        if (err != 0)
            FAIL("pthread_create: %s", strerror(err));
    }
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(tids[t], NULL);
    tu_checks++;
    printf("ok   %s\n", what);
}

static void scenario(uint32_t cluster_size) {
    char image[TU_PATH], raw[TU_PATH], heading[200];
    snprintf(heading, sizeof heading, "%d threads on one handle, %u-byte clusters", NTHREADS,
             cluster_size);
    SECTION(heading);
    snprintf(image, sizeof image, "%s/threads-%u.qcow2", tu_scratch, cluster_size);
    memset(model, 0, DISK_SIZE);

    cowdisk_create_opts copts;
    memset(&copts, 0, sizeof copts);
    copts.struct_size = sizeof copts;
    copts.cluster_size = cluster_size;
    CHECK_RC(cowdisk_create(image, DISK_SIZE, &copts), 0, "create an 8 MiB image");
    CHECK_RC(cowdisk_open(image, NULL, &shared_img), 0, "open it read-write");

    /* The main thread's last error must survive failures on other threads. */
    CHECK_RC(cowdisk_pread(NULL, model, 1, 0), -EINVAL, "a failure on the main thread");
    char main_error[512];
    snprintf(main_error, sizeof main_error, "%s", cowdisk_last_error());

    struct job jobs[NTHREADS];
    for (int pass = 0; pass < 2; pass++) {
        for (int t = 0; t < NTHREADS; t++) {
            jobs[t].thread = t;
            jobs[t].pass = pass;
            jobs[t].seed = (unsigned)(t * 7919 + pass * 104729 + (int)cluster_size);
        }
        run_threads(writer, jobs, sizeof jobs[0],
                    pass == 0 ? "pass 1: 8 threads write interleaved, disjoint and "
                                "unaligned pieces into new clusters, each reading its own "
                                "pieces back"
                              : "pass 2: 8 threads rewrite the pieces other threads wrote");
        verify_disk(shared_img, pass == 0 ? "after pass 1 the disk holds every piece"
                                          : "after pass 2 the disk holds every rewrite");
    }
    CHECK(strcmp(cowdisk_last_error(), main_error) == 0,
          "the main thread's last error is unchanged by other threads' failures");

    struct reader_job readers[NTHREADS];
    for (int t = 0; t < NTHREADS; t++)
        readers[t].thread = t;
    run_threads(reader, readers, sizeof readers[0],
                "8 threads read the whole disk concurrently and see the right data");

    CHECK_RC(cowdisk_close(shared_img), 0, "close");
    shared_img = NULL;
    tu_qemu_img_check(image);
    snprintf(raw, sizeof raw, "%s/threads-%u.raw", tu_scratch, cluster_size);
    tu_write_file(raw, model, DISK_SIZE);
    tu_qemu_img_compare(image, raw);

    cowdisk_open_opts oopts;
    memset(&oopts, 0, sizeof oopts);
    oopts.struct_size = sizeof oopts;
    oopts.flags = COWDISK_OPEN_READONLY;
    CHECK_RC(cowdisk_open(image, &oopts, &shared_img), 0, "reopen read-only");
    run_threads(reader, readers, sizeof readers[0],
                "8 threads read the reopened image and see the right data");
    CHECK_RC(cowdisk_close(shared_img), 0, "close");
    shared_img = NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("threads");
    model = calloc(1, DISK_SIZE);
    if (model == NULL)
        FAIL("out of memory");
    scenario(65536);
    scenario(4096);
    free(model);
    tu_finish("threads");
    return 0;
}
