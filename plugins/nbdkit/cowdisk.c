/* nbdkit-cowdisk-plugin: serves a qcow2 image through libcowdisk over NBD.
 *
 *   nbdkit cowdisk [file=]IMG [readonly=true] [secret-file=F] [snapshot=NAME]
 *                  [direct=true] [backing=false] [unmap=true]
 *
 * One cowdisk handle serves every connection: libcowdisk is thread-safe and a
 * flush covers all writes of the handle, so the plugin runs fully parallel and
 * advertises multi-conn. The image is opened in .get_ready, before nbdkit forks
 * into the background, so a missing image, a wrong passphrase or a corrupt image
 * stops nbdkit at startup with cowdisk's message. (libcowdisk starts no thread at
 * open that a forked child would miss: its crypto workers start per process.)
 *
 * See plugins/nbdkit/README.md.
 */

#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nbdkit-plugin.h>

#include "cowdisk.h"

/* Configuration, set by .config. */
static char *image_path;  /* absolute: nbdkit may chdir("/") when forking */
static char *secret_path;
static char *snapshot_name;
static bool opt_readonly;
static bool opt_readonly_set;
static bool opt_direct;
static bool opt_backing = true;
static bool opt_unmap;

/* The image, opened in .get_ready and closed in .cleanup. */
static struct cowdisk *img;
static struct cowdisk_info info;

/* A limit on passphrase files: LUKS passphrases are short; this only keeps a
 * wrong path (a disk image, /dev/zero) from being read into memory. */
#define MAX_SECRET (64 * 1024)

/* Extents asked of cowdisk_block_status at a time. */
#define EXTENTS_BATCH 256

/* Reports a failed cowdisk call: its message through nbdkit_error, its errno to
 * the client. */
static int
fail (const char *what, int rc)
{
  const char *msg = cowdisk_last_error ();
  if (msg == NULL || *msg == '\0')
    msg = cowdisk_strerror (rc);
  nbdkit_error ("%s: %s", what, msg);
  nbdkit_set_error (rc < 0 ? -rc : EIO);
  return -1;
}

static void
plugin_unload (void)
{
  free (image_path);
  free (secret_path);
  free (snapshot_name);
}

static int
parse_bool (const char *value, bool *out)
{
  int r = nbdkit_parse_bool (value);
  if (r == -1)
    return -1; /* nbdkit_parse_bool reported it */
  *out = r != 0;
  return 0;
}

static int
replace_path (char **dst, const char *value)
{
  /* Not nbdkit_realpath: a missing file is reported by cowdisk_open, in
   * cowdisk's words. */
  char *p = nbdkit_absolute_path (value);
  if (p == NULL)
    return -1;
  free (*dst);
  *dst = p;
  return 0;
}

static int
plugin_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0)
    return replace_path (&image_path, value);
  if (strcmp (key, "secret-file") == 0)
    return replace_path (&secret_path, value);
  if (strcmp (key, "snapshot") == 0) {
    if (*value == '\0') {
      nbdkit_error ("snapshot: give the id or name of an internal snapshot");
      return -1;
    }
    free (snapshot_name);
    snapshot_name = strdup (value);
    if (snapshot_name == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "readonly") == 0) {
    opt_readonly_set = true;
    return parse_bool (value, &opt_readonly);
  }
  if (strcmp (key, "direct") == 0)
    return parse_bool (value, &opt_direct);
  if (strcmp (key, "backing") == 0)
    return parse_bool (value, &opt_backing);
  if (strcmp (key, "unmap") == 0)
    return parse_bool (value, &opt_unmap);
  nbdkit_error ("unknown parameter '%s' (see nbdkit cowdisk --help)", key);
  return -1;
}

static int
plugin_config_complete (void)
{
  if (image_path == NULL) {
    nbdkit_error ("file=IMG is required: the qcow2 image to serve");
    return -1;
  }
  if (snapshot_name != NULL) {
    if (opt_readonly_set && !opt_readonly) {
      nbdkit_error ("snapshot=%s is served read-only; drop readonly=false",
                    snapshot_name);
      return -1;
    }
    opt_readonly = true;
  }
  return 0;
}

#define plugin_config_help \
  "[file=]IMG          (required) The qcow2 image to serve.\n" \
  "readonly=true       Open the image read-only (shared with other readers).\n" \
  "secret-file=FILE    Passphrase of an encrypted image: the whole file, byte for byte.\n" \
  "snapshot=ID|NAME    Serve an internal snapshot (read-only).\n" \
  "direct=true         O_DIRECT on the image file (QEMU's cache=none).\n" \
  "backing=false       Do not open backing files.\n" \
  "unmap=true          Punch freed clusters out of the image file (discard=unmap)."

static void
plugin_dump_plugin (void)
{
  printf ("cowdisk_version=%s\n", cowdisk_version ());
}

/* Reads the passphrase file into *buf (malloc'd; the caller wipes and frees it). */
static int
read_secret (void **buf, size_t *len)
{
  int fd = open (secret_path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    nbdkit_error ("secret-file %s: %m", secret_path);
    return -1;
  }
  unsigned char *p = malloc (MAX_SECRET);
  if (p == NULL) {
    nbdkit_error ("malloc: %m");
    close (fd);
    return -1;
  }
  size_t n = 0;
  for (;;) {
    if (n == MAX_SECRET) {
      nbdkit_error ("secret-file %s: longer than %d bytes", secret_path,
                    MAX_SECRET);
      goto err;
    }
    ssize_t r = read (fd, p + n, MAX_SECRET - n);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1) {
      nbdkit_error ("secret-file %s: %m", secret_path);
      goto err;
    }
    if (r == 0)
      break;
    n += (size_t) r;
  }
  close (fd);
  if (n == 0) {
    nbdkit_error ("secret-file %s is empty", secret_path);
    free (p);
    return -1;
  }
  *buf = p;
  *len = n;
  return 0;

err:
  explicit_bzero (p, MAX_SECRET);
  free (p);
  close (fd);
  return -1;
}

static int
plugin_get_ready (void)
{
  struct cowdisk_open_opts opts;
  memset (&opts, 0, sizeof opts);
  opts.struct_size = sizeof opts;
  if (opt_readonly)
    opts.flags |= COWDISK_OPEN_READONLY;
  if (opt_direct)
    opts.flags |= COWDISK_OPEN_DIRECT;
  if (!opt_backing)
    opts.flags |= COWDISK_OPEN_NO_BACKING;
  if (opt_unmap)
    opts.flags |= COWDISK_OPEN_DISCARD_UNMAP;
  opts.snapshot = snapshot_name;

  void *secret = NULL;
  size_t secret_len = 0;
  if (secret_path != NULL && read_secret (&secret, &secret_len) == -1)
    return -1;
  opts.secret = secret;
  opts.secret_len = secret_len;

  int rc = cowdisk_open (image_path, &opts, &img);
  if (secret != NULL) {
    explicit_bzero (secret, secret_len);
    free (secret);
  }
  if (rc < 0) {
    /* cowdisk's message already names the file. */
    const char *msg = cowdisk_last_error ();
    nbdkit_error ("%s", msg && *msg ? msg : cowdisk_strerror (rc));
    img = NULL;
    return -1;
  }

  memset (&info, 0, sizeof info);
  info.struct_size = sizeof info;
  rc = cowdisk_get_info (img, &info);
  if (rc < 0) {
    fail ("cowdisk_get_info", rc);
    cowdisk_close (img);
    img = NULL;
    return -1;
  }
  if (!opt_readonly && (info.flags & COWDISK_INFO_CORRUPT)) {
    nbdkit_error ("%s is marked corrupt: repair it with 'cowdisk check -r all' "
                  "or serve it with readonly=true", image_path);
    cowdisk_close (img);
    img = NULL;
    return -1;
  }
  nbdkit_debug ("cowdisk %s: %s, v%u, %" PRIu64 " bytes, %u-byte clusters%s",
                cowdisk_version (), image_path, info.version,
                info.virtual_size, info.cluster_size,
                opt_readonly ? ", read-only" : "");
  return 0;
}

/* Called once every connection is gone: the last flush happens here. */
static void
plugin_cleanup (void)
{
  if (img == NULL)
    return;
  int rc = cowdisk_close (img);
  img = NULL;
  if (rc < 0) {
    const char *msg = cowdisk_last_error ();
    nbdkit_error ("closing %s: %s", image_path,
                  msg && *msg ? msg : cowdisk_strerror (rc));
  }
}

/* Every connection shares the one image handle. */
static void *
plugin_open (int readonly)
{
  (void) readonly;
  return img;
}

static int64_t
plugin_get_size (void *handle)
{
  (void) handle;
  return (int64_t) info.virtual_size;
}

static int
plugin_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                    uint32_t *maximum)
{
  (void) handle;
  /* Any alignment works (unaligned requests are read-modify-written inside);
   * whole clusters avoid copy-on-write of partial ones. */
  *minimum = 1;
  *preferred = info.cluster_size < 4096 ? 4096 : info.cluster_size;
  *maximum = 0xffffffff;
  return 0;
}

/* can_write and can_trim. */
static int
plugin_writable (void *handle)
{
  (void) handle;
  return !opt_readonly;
}

/* can_flush, can_zero, can_multi_conn, can_extents, and can_fast_zero: zeroing is
 * a metadata update except on v2 images with a backing file, which plugin_zero
 * refuses truthfully. */
static int
plugin_yes (void *handle)
{
  (void) handle;
  return 1;
}

static int
plugin_can_fua (void *handle)
{
  (void) handle;
  return NBDKIT_FUA_NATIVE;
}

static int
plugin_can_cache (void *handle)
{
  (void) handle;
  return NBDKIT_CACHE_NATIVE;
}

static int
flush_for_fua (struct cowdisk *h, uint32_t flags)
{
  if (!(flags & NBDKIT_FLAG_FUA))
    return 0;
  nbdkit_debug ("cowdisk: FUA: flushing");
  int rc = cowdisk_flush (h);
  return rc < 0 ? fail ("flush", rc) : 0;
}

static int
plugin_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
               uint32_t flags)
{
  (void) flags;
  int rc = cowdisk_pread (handle, buf, count, offset);
  return rc < 0 ? fail ("read", rc) : 0;
}

static int
plugin_pwrite (void *handle, const void *buf, uint32_t count,
                uint64_t offset, uint32_t flags)
{
  int rc = cowdisk_pwrite (handle, buf, count, offset);
  if (rc < 0)
    return fail ("write", rc);
  return flush_for_fua (handle, flags);
}

static int
plugin_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  /* A v2 image with a backing file has no zero clusters: cowdisk writes zeros
   * as data there, which is no faster than the client writing them. */
  if ((flags & NBDKIT_FLAG_FAST_ZERO) && info.version < 3 &&
      info.backing_file[0] != '\0') {
    nbdkit_set_error (ENOTSUP);
    return -1;
  }
  uint32_t zflags = (flags & NBDKIT_FLAG_MAY_TRIM) ? COWDISK_ZEROES_MAY_UNMAP : 0;
  int rc = cowdisk_write_zeroes (handle, offset, count, zflags);
  if (rc < 0)
    return fail ("zero", rc);
  return flush_for_fua (handle, flags);
}

static int
plugin_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  int rc = cowdisk_discard (handle, offset, count);
  if (rc < 0)
    return fail ("trim", rc);
  return flush_for_fua (handle, flags);
}

static int
plugin_flush (void *handle, uint32_t flags)
{
  (void) flags;
  int rc = cowdisk_flush (handle);
  return rc < 0 ? fail ("flush", rc) : 0;
}

/* NBD's view of a run: a hole where no layer stores data (unallocated or zero
 * clusters), zero where it reads as zeros — what qemu-nbd reports. */
static uint32_t
nbd_type (uint32_t flags)
{
  uint32_t t = 0;
  if (!(flags & COWDISK_EXTENT_DATA))
    t |= NBDKIT_EXTENT_HOLE;
  if (flags & COWDISK_EXTENT_ZERO)
    t |= NBDKIT_EXTENT_ZERO;
  return t;
}

static int
plugin_extents (void *handle, uint32_t count, uint64_t offset,
                 uint32_t flags, struct nbdkit_extents *extents)
{
  struct cowdisk_extent ext[EXTENTS_BATCH];
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  while (pos < end) {
    size_t n = 0;
    int rc = cowdisk_block_status (handle, pos, end - pos, ext,
                                   (flags & NBDKIT_FLAG_REQ_ONE) ? 1 : EXTENTS_BATCH,
                                   &n);
    if (rc < 0)
      return fail ("block status", rc);
    if (n == 0)
      break; /* at the end of the disk */
    for (size_t i = 0; i < n; i++) {
      if (nbdkit_add_extent (extents, ext[i].start, ext[i].length,
                             nbd_type (ext[i].flags)) == -1)
        return -1;
    }
    pos = ext[n - 1].start + ext[n - 1].length;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

/* NBD_CMD_CACHE: reads the stored data of the range, so that its metadata and
 * (without direct=true) its host pages are in memory. Holes are skipped. */
static int
plugin_cache (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  enum { CHUNK = 1024 * 1024 };
  struct cowdisk_extent ext[EXTENTS_BATCH];
  char *buf = NULL;
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  int ret = 0;
  while (pos < end && ret == 0) {
    size_t n = 0;
    int rc = cowdisk_block_status (handle, pos, end - pos, ext, EXTENTS_BATCH, &n);
    if (rc < 0) {
      ret = fail ("cache", rc);
      break;
    }
    if (n == 0)
      break;
    for (size_t i = 0; i < n && ret == 0; i++) {
      if (!(ext[i].flags & COWDISK_EXTENT_DATA) || (ext[i].flags & COWDISK_EXTENT_ZERO))
        continue;
      if (buf == NULL && (buf = malloc (CHUNK)) == NULL) {
        nbdkit_error ("malloc: %m");
        nbdkit_set_error (ENOMEM);
        ret = -1;
        break;
      }
      for (uint64_t o = ext[i].start; o < ext[i].start + ext[i].length; o += CHUNK) {
        uint64_t left = ext[i].start + ext[i].length - o;
        rc = cowdisk_pread (handle, buf, left < CHUNK ? left : CHUNK, o);
        if (rc < 0) {
          ret = fail ("cache", rc);
          break;
        }
      }
    }
    pos = ext[n - 1].start + ext[n - 1].length;
  }
  free (buf);
  return ret;
}

static struct nbdkit_plugin plugin = {
  .name = "cowdisk",
  .longname = "nbdkit cowdisk plugin (qcow2 images through libcowdisk)",
  .version = COWDISK_VERSION_STRING,
  .description = "Serves a qcow2 image (with its backing chain, internal "
                 "snapshots, compression and LUKS encryption) through libcowdisk.",
  .magic_config_key = "file",
  .unload = plugin_unload,
  .config = plugin_config,
  .config_complete = plugin_config_complete,
  .config_help = plugin_config_help,
  .dump_plugin = plugin_dump_plugin,
  .get_ready = plugin_get_ready,
  .cleanup = plugin_cleanup,
  .open = plugin_open,
  .get_size = plugin_get_size,
  .block_size = plugin_block_size,
  .can_write = plugin_writable,
  .can_flush = plugin_yes,
  .can_trim = plugin_writable,
  .can_zero = plugin_yes,
  .can_fast_zero = plugin_yes,
  .can_fua = plugin_can_fua,
  .can_multi_conn = plugin_yes,
  .can_extents = plugin_yes,
  .can_cache = plugin_can_cache,
  .pread = plugin_pread,
  .pwrite = plugin_pwrite,
  .zero = plugin_zero,
  .trim = plugin_trim,
  .flush = plugin_flush,
  .extents = plugin_extents,
  .cache = plugin_cache,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
