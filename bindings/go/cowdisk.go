// Package cowdisk reads and writes qcow2 disk images through libcowdisk, a qcow2
// block-driver library with a stable C ABI.
//
// Create makes a new image and Open opens one; the returned *Image implements
// io.ReaderAt, io.WriterAt and io.Closer over the image's guest-visible contents
// (its "virtual disk"), so it works with io.NewSectionReader and friends.
//
//	if err := cowdisk.Create("disk.qcow2", 1<<30, nil); err != nil { ... }
//	img, err := cowdisk.Open("disk.qcow2", nil)
//	if err != nil { ... }
//	defer img.Close()
//	_, err = img.WriteAt([]byte("hello"), 4096)
//
// Convert, Compare, Commit and Rebase work on image files as the qemu-img
// commands of the same names do; the long ones take a context.Context that
// cancels them and report progress through a callback.
//
// An *Image may be used by many goroutines at once. Errors are *Error values that
// wrap a syscall.Errno, so errors.Is(err, syscall.ENOENT) or
// errors.Is(err, fs.ErrNotExist) work.
//
// Building: by default the package finds an installed libcowdisk with pkg-config
// (`#cgo pkg-config: cowdisk`; `make install` at the repository root installs it).
// Build tag cowdisk_repo links the static library build/lib/libcowdisk.a of the
// source tree instead, cowdisk_repo_shared its shared library; see README.md.
package cowdisk

/*
#include <stdlib.h>
#include <string.h>
#include <cowdisk.h>
*/
import "C"

import (
	"bytes"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Version returns the version of the linked libcowdisk, for example "0.1.0".
func Version() string {
	return C.GoString(C.cowdisk_version())
}

// CreateOptions are the settings of a new image. The zero value of every field
// means the library's default (QEMU's defaults).
type CreateOptions struct {
	// Version is the qcow2 version, 2 or 3 (0 = 3).
	Version uint32
	// ClusterSize is the cluster size in bytes, a power of two from 512 to
	// 2 MiB (0 = 64 KiB).
	ClusterSize uint32
	// RefcountBits is the refcount width: 1, 2, 4, 8, 16, 32 or 64 (0 = 16).
	// Version 2 images only allow 16.
	RefcountBits uint32
	// LazyRefcounts enables lazy refcounts (version 3 only).
	LazyRefcounts bool
	// BackingFile is the backing file name stored in the image ("" = none).
	// A relative name is resolved against the image's directory. When it is set
	// and the size passed to Create is 0, the backing file's size is used.
	BackingFile string
	// BackingFormat is the backing file's format, "qcow2" or "raw" ("" = probe).
	BackingFormat string
	// CompressionType is the codec of compressed clusters: "zlib" or "zstd"
	// ("" = "zlib"; "zstd" needs version 3).
	CompressionType string
	// EncryptFormat encrypts the image: "luks" (QEMU's LUKS, aes-256-xts-plain64
	// unless the Cipher fields say otherwise), "aes" (QEMU's legacy AES, weak: only
	// when asked for) or "" (not encrypted). It needs Secret.
	EncryptFormat string
	// Secret is the passphrase of an encrypted image. The binding copies it into C
	// memory for the call and zeroes that copy afterwards; zero your own slice
	// when you no longer need it.
	Secret []byte
	// IterTime is how long the LUKS key derivation should take (0 = QEMU's 2 s);
	// short times make tests fast, long ones make guessing the passphrase slow.
	IterTime time.Duration
	// CipherAlg is the LUKS cipher: "aes-128", "aes-192" or "aes-256" ("" = aes-256).
	CipherAlg string
	// CipherMode is the LUKS cipher mode: "xts" or "cbc" ("" = xts).
	CipherMode string
	// IvgenAlg is the LUKS IV generator: "plain", "plain64" or "essiv" ("" = plain64).
	IvgenAlg string
	// IvgenHashAlg is the hash of the essiv IV generator ("" = sha256).
	IvgenHashAlg string
	// HashAlg is the LUKS key-derivation hash: "sha1", "sha256" or "sha512"
	// ("" = sha256).
	HashAlg string
}

// compressionNames are the CompressionType names, indexed by their C code.
var compressionNames = [...]string{0: "zlib", 1: "zstd"}

// cString converts s to a C string owned by the caller (free with C.free),
// rejecting strings with NUL bytes, which C cannot represent.
func cString(op, path, what, s string) (*C.char, error) {
	if strings.IndexByte(s, 0) >= 0 {
		return nil, newError(op, path, syscall.EINVAL, "invalid argument: %s contains a NUL byte", what)
	}
	return C.CString(s), nil
}

// Create creates a new qcow2 image of size bytes at path, which must not exist
// yet (syscall.EEXIST otherwise). size is rounded up to a multiple of 512, as
// qemu-img does. A nil opts uses the defaults: version 3, 64 KiB clusters, 16-bit
// refcounts, no backing file. Bad options are syscall.EINVAL.
func Create(path string, size uint64, opts *CreateOptions) error {
	const op = "create"
	cpath, err := cString(op, path, "path", path)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cpath))

	var copts *C.cowdisk_create_opts
	if opts != nil {
		var co C.cowdisk_create_opts
		var strs cStrings
		defer strs.free()
		if err := fillCreateOpts(op, path, opts, &co, &strs); err != nil {
			return err
		}
		copts = &co
	}
	return call(op, path, func() C.int {
		return C.cowdisk_create(cpath, C.uint64_t(size), copts)
	})
}

// cStrings are C strings to free together once a C call has returned.
type cStrings struct {
	strs    []*C.char
	secrets []cSecret
}

// cSecret is a passphrase copied into C memory (Go memory must not be referenced
// from the C structs passed to the library), zeroed before it is freed.
type cSecret struct {
	p unsafe.Pointer
	n C.size_t
}

// add converts s with cString and records the result for free.
func (cs *cStrings) add(op, path, what, s string) (*C.char, error) {
	c, err := cString(op, path, what, s)
	if err != nil {
		return nil, err
	}
	cs.strs = append(cs.strs, c)
	return c, nil
}

// addSecret copies a passphrase into C memory, recorded to be wiped and freed.
// It returns NULL and 0 for an empty passphrase (none given).
func (cs *cStrings) addSecret(b []byte) (unsafe.Pointer, C.size_t) {
	if len(b) == 0 {
		return nil, 0
	}
	p := C.CBytes(b)
	cs.secrets = append(cs.secrets, cSecret{p, C.size_t(len(b))})
	return p, C.size_t(len(b))
}

// free frees every recorded string, and zeroes and frees every passphrase.
func (cs *cStrings) free() {
	for _, c := range cs.strs {
		C.free(unsafe.Pointer(c))
	}
	for _, s := range cs.secrets {
		C.memset(s.p, 0, s.n)
		C.free(s.p)
	}
	cs.strs, cs.secrets = nil, nil
}

// fillCreateOpts sets co (which may live in C or Go memory) from opts; the C
// strings it points to are recorded in strs, to free after the call.
func fillCreateOpts(op, path string, opts *CreateOptions, co *C.cowdisk_create_opts, strs *cStrings) error {
	co.struct_size = C.uint32_t(C.sizeof_cowdisk_create_opts)
	co.version = C.uint32_t(opts.Version)
	co.cluster_size = C.uint32_t(opts.ClusterSize)
	co.refcount_bits = C.uint32_t(opts.RefcountBits)
	if opts.LazyRefcounts {
		co.flags |= C.COWDISK_CREATE_LAZY_REFCOUNTS
	}
	switch opts.CompressionType {
	case "", "zlib":
		co.compression_type = 0
	case "zstd":
		co.compression_type = 1
	default:
		return newError(op, path, syscall.EINVAL,
			"invalid argument: unknown compression type %q (use \"zlib\" or \"zstd\")", opts.CompressionType)
	}
	if opts.BackingFile != "" {
		s, err := strs.add(op, path, "backing file name", opts.BackingFile)
		if err != nil {
			return err
		}
		co.backing_file = s
	}
	if opts.BackingFormat != "" {
		s, err := strs.add(op, path, "backing format", opts.BackingFormat)
		if err != nil {
			return err
		}
		co.backing_format = s
	}
	switch opts.EncryptFormat {
	case "":
		co.encrypt_format = C.COWDISK_ENCRYPT_NONE
	case "aes":
		co.encrypt_format = C.COWDISK_ENCRYPT_AES
	case "luks":
		co.encrypt_format = C.COWDISK_ENCRYPT_LUKS
	default:
		return newError(op, path, syscall.EINVAL,
			"invalid argument: unknown encryption format %q (use \"luks\" or \"aes\")", opts.EncryptFormat)
	}
	if opts.IterTime < 0 || opts.IterTime/time.Millisecond > 1<<32-1 {
		return newError(op, path, syscall.EINVAL, "invalid argument: IterTime %v out of range", opts.IterTime)
	}
	co.iter_time_ms = C.uint32_t(opts.IterTime / time.Millisecond)
	for _, f := range []struct {
		what, val string
		dst       **C.char
	}{
		{"cipher algorithm", opts.CipherAlg, &co.cipher_alg},
		{"cipher mode", opts.CipherMode, &co.cipher_mode},
		{"IV generator", opts.IvgenAlg, &co.ivgen_alg},
		{"IV generator hash", opts.IvgenHashAlg, &co.ivgen_hash_alg},
		{"hash algorithm", opts.HashAlg, &co.hash_alg},
	} {
		if f.val != "" {
			s, err := strs.add(op, path, f.what, f.val)
			if err != nil {
				return err
			}
			*f.dst = s
		}
	}
	p, n := strs.addSecret(opts.Secret)
	co.secret, co.secret_len = p, n
	return nil
}

// OpenOptions control how an image is opened. The zero value opens read-write with
// buffered I/O, following backing files (as QEMU does).
type OpenOptions struct {
	// ReadOnly refuses all writes; they fail with syscall.EROFS.
	ReadOnly bool
	// Direct opens the image file with O_DIRECT, bypassing the host page cache
	// (the host file system must support it).
	Direct bool
	// NoBacking refuses to open the backing files named inside the image (use it
	// for untrusted images). Reads of unallocated clusters of an image that has a
	// backing file then fail with syscall.ENOTSUP.
	NoBacking bool
	// L2CacheSize is the number of bytes of L2 tables to cache (0 = enough to cover
	// the whole disk, up to 32 MiB).
	L2CacheSize uint64
	// MaxBackingDepth is the maximum length of the backing chain (0 = 32).
	MaxBackingDepth uint32
	// DiscardUnmap punches the clusters freed by Discard (and by WriteZeroes with
	// mayUnmap) out of the image file, like QEMU's discard=unmap.
	DiscardUnmap bool
	// NoCompressedCache writes each compressed cluster of WriteCompressedAt on its
	// own (as QEMU does) instead of gathering them into whole host clusters written
	// with aligned writes.
	NoCompressedCache bool
	// CompressedCacheSize is the memory of the compressed-write cache in bytes
	// (0 = 4 MiB).
	CompressedCacheSize uint64
	// ForceShare (with ReadOnly) opens the image even while another process
	// writes it, like qemu-img -U. Without it, opening an image another process
	// (QEMU or cowdisk) holds in a conflicting way fails with syscall.EBUSY.
	ForceShare bool
	// NoLock takes no locks on the image file and its backing files (QEMU's
	// locking=off), for callers that coordinate access themselves.
	NoLock bool
	// Check opens an image marked corrupt read-write for Check to repair (other
	// writes fail until a repair leaves nothing to fix), as qemu-img check does.
	Check bool
	// Secret is the passphrase of an encrypted image (and of encrypted backing
	// files). Without it opening one fails with syscall.ENOKEY, with a wrong one
	// syscall.EKEYREJECTED. The binding zeroes its C copy after the call.
	Secret []byte
	// MetadataOnly opens an encrypted image without its passphrase, for Info, Check
	// and Map; reading or writing its data then fails with syscall.ENOKEY.
	MetadataOnly bool
	// Snapshot (the id or name of an internal snapshot, with ReadOnly) shows the
	// disk as that snapshot recorded it, its contents and size, like qemu-img
	// convert -l; syscall.ENOENT when the image has no such snapshot.
	Snapshot string
	// DropBitmaps lets a read-write open go on when the image's persistent dirty
	// bitmaps cannot be kept (an unknown bitmap type or flag, a damaged bitmap
	// directory): they are given up, as a program without bitmap support would
	// (their clusters leak until Check repairs leaks). Without it such an open
	// fails and says why. Readable bitmaps are kept either way.
	DropBitmaps bool
}

// Image is an open qcow2 image. It is safe for concurrent use by multiple
// goroutines, including a Close racing other calls: calls that start after Close
// fail with an error matching ErrClosed.
//
// An Image that becomes unreachable without being closed is closed (and flushed)
// by a finalizer, but errors are then lost: call Close.
type Image struct {
	path string
	size atomic.Int64 // virtual size in bytes, cached

	// resizeMu orders Resize calls, so that the cached size is the last one set.
	resizeMu sync.Mutex

	// mu is held for reading by every call that uses h and for writing by Close,
	// so that the handle is never freed while a C call still uses it.
	mu sync.RWMutex
	h  *C.cowdisk // nil once closed
}

// Open opens the qcow2 image at path. A nil opts is the same as &OpenOptions{}.
// The returned Image must be closed with Close.
//
// Typical errors: syscall.ENOENT (and other host errors) for the file,
// syscall.EINVAL for a file that is not qcow2, syscall.ENOTSUP for features the
// library does not implement (named in the message), syscall.EIO for corrupt
// metadata.
func Open(path string, opts *OpenOptions) (*Image, error) {
	const op = "open"
	cpath, err := cString(op, path, "path", path)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cpath))

	var copts *C.cowdisk_open_opts
	if opts != nil {
		var co C.cowdisk_open_opts
		co.struct_size = C.uint32_t(C.sizeof_cowdisk_open_opts)
		if opts.ReadOnly {
			co.flags |= C.COWDISK_OPEN_READONLY
		}
		if opts.Direct {
			co.flags |= C.COWDISK_OPEN_DIRECT
		}
		if opts.NoBacking {
			co.flags |= C.COWDISK_OPEN_NO_BACKING
		}
		if opts.DiscardUnmap {
			co.flags |= C.COWDISK_OPEN_DISCARD_UNMAP
		}
		if opts.NoCompressedCache {
			co.flags |= C.COWDISK_OPEN_NO_COMPRESSED_CACHE
		}
		if opts.ForceShare {
			co.flags |= C.COWDISK_OPEN_FORCE_SHARE
		}
		if opts.NoLock {
			co.flags |= C.COWDISK_OPEN_NO_LOCK
		}
		if opts.Check {
			co.flags |= C.COWDISK_OPEN_CHECK
		}
		if opts.MetadataOnly {
			co.flags |= C.COWDISK_OPEN_METADATA_ONLY
		}
		if opts.DropBitmaps {
			co.flags |= C.COWDISK_OPEN_DROP_BITMAPS
		}
		var strs cStrings
		defer strs.free()
		co.secret, co.secret_len = strs.addSecret(opts.Secret)
		if opts.Snapshot != "" {
			if co.snapshot, err = strs.add(op, path, "snapshot", opts.Snapshot); err != nil {
				return nil, err
			}
		}
		co.compressed_cache_size = C.uint64_t(opts.CompressedCacheSize)
		co.l2_cache_size = C.uint64_t(opts.L2CacheSize)
		co.max_backing_depth = C.uint32_t(opts.MaxBackingDepth)
		copts = &co
	}

	var h *C.cowdisk
	err = call(op, path, func() C.int {
		return C.cowdisk_open(cpath, copts, &h)
	})
	if err != nil {
		return nil, err
	}
	img := &Image{path: path, h: h}
	info, err := img.Info()
	if err != nil {
		img.Close()
		return nil, err
	}
	img.size.Store(int64(info.VirtualSize))
	runtime.SetFinalizer(img, (*Image).Close)
	return img, nil
}

// do runs one C call on the live handle with the read lock held; it fails with
// an ErrClosed error if the image is closed. fn receives the handle and makes
// exactly one cowdisk call that returns 0 or a negative errno.
//
// Every new handle method (WriteZeroes, Discard, snapshots, ...) is a one-line
// use of do.
func (img *Image) do(op string, fn func(h *C.cowdisk) C.int) error {
	img.mu.RLock()
	defer img.mu.RUnlock()
	h := img.h
	if h == nil {
		return closedError(op, img.path)
	}
	err := call(op, img.path, func() C.int { return fn(h) })
	runtime.KeepAlive(img)
	return err
}

// Path returns the path the image was opened with.
func (img *Image) Path() string { return img.path }

// Size returns the virtual size of the image (the size of the guest disk) in bytes.
func (img *Image) Size() int64 { return img.size.Load() }

// bufPtr returns a pointer to the first byte of p, or nil for an empty slice.
// The slice is passed to C without copying.
func bufPtr(p []byte) unsafe.Pointer {
	if len(p) == 0 {
		return nil
	}
	return unsafe.Pointer(&p[0])
}

// ReadAt reads len(p) bytes of the guest disk at offset off, implementing
// io.ReaderAt. Unallocated clusters read from the backing chain, or as zeros.
//
// End of disk: like *os.File, a read that starts at or past Size() returns
// 0, io.EOF, and a read that crosses Size() fills the part before the end and
// returns the count with io.EOF; an empty p returns 0, nil. A negative off is
// syscall.EINVAL. On any other error n is 0: the library reads a range
// completely or reports failure.
func (img *Image) ReadAt(p []byte, off int64) (n int, err error) {
	const op = "read"
	if off < 0 {
		return 0, newError(op, img.path, syscall.EINVAL, "invalid argument: negative offset %d", off)
	}
	size := img.Size()
	if off >= size || len(p) == 0 {
		// Nothing to ask the library, but still report use after Close.
		img.mu.RLock()
		closed := img.h == nil
		img.mu.RUnlock()
		if closed {
			return 0, closedError(op, img.path)
		}
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n = len(p)
	if rest := size - off; int64(n) > rest {
		n = int(rest)
	}
	err = img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_pread(h, bufPtr(p), C.size_t(n), C.uint64_t(off))
	})
	runtime.KeepAlive(p)
	if err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes len(p) bytes to the guest disk at offset off, implementing
// io.WriterAt. The whole range must lie within Size(); otherwise nothing is
// written and the error is syscall.EINVAL. A read-only image gives syscall.EROFS.
// n is len(p) or 0. A host failure (syscall.EIO, syscall.ENOSPC) leaves the range
// undefined, as on a disk, and the image usable: retry the write once the cause is
// gone. Data is durable only after Flush or Close.
func (img *Image) WriteAt(p []byte, off int64) (n int, err error) {
	const op = "write"
	if off < 0 {
		return 0, newError(op, img.path, syscall.EINVAL, "invalid argument: negative offset %d", off)
	}
	err = img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_pwrite(h, bufPtr(p), C.size_t(len(p)), C.uint64_t(off))
	})
	runtime.KeepAlive(p)
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteCompressedAt writes p at guest offset off as compressed clusters, with the
// compression type chosen when the image was created (zlib or zstd). off must be
// cluster-aligned and len(p) whole clusters; only the image's last cluster may be
// partial. The clusters must be unallocated in this image, as QEMU requires
// (syscall.EINVAL otherwise, and nothing is written). Clusters that do not
// compress are stored normally. The clusters of one call are compressed on all
// cores. The write is all or nothing: n is len(p) or 0.
func (img *Image) WriteCompressedAt(p []byte, off int64) (n int, err error) {
	const op = "write_compressed"
	if off < 0 {
		return 0, newError(op, img.path, syscall.EINVAL, "invalid argument: negative offset %d", off)
	}
	err = img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_pwrite_compressed(h, bufPtr(p), C.size_t(len(p)), C.uint64_t(off))
	})
	runtime.KeepAlive(p)
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush makes everything written so far durable on the host storage.
func (img *Image) Flush() error {
	return img.do("flush", func(h *C.cowdisk) C.int { return C.cowdisk_flush(h) })
}

// Close flushes the image and releases it, returning the flush status; the image
// is released even when the flush fails. Close waits for calls in progress on
// other goroutines. It is idempotent: calling it again returns nil. Every other
// method fails with an error matching ErrClosed after Close.
func (img *Image) Close() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.h
	if h == nil {
		return nil
	}
	img.h = nil
	runtime.SetFinalizer(img, nil)
	return call("close", img.path, func() C.int { return C.cowdisk_close(h) })
}

// Info describes an open image.
type Info struct {
	// Version is the qcow2 version, 2 or 3.
	Version uint32
	// VirtualSize is the size of the guest disk in bytes.
	VirtualSize uint64
	// ClusterSize is the cluster size in bytes.
	ClusterSize uint32
	// RefcountBits is the refcount width in bits.
	RefcountBits uint32
	// ReadOnly is true when the image was opened read-only.
	ReadOnly bool
	// LazyRefcounts is true when the image has lazy refcounts enabled.
	LazyRefcounts bool
	// Dirty is true when the image's dirty bit is set.
	Dirty bool
	// Corrupt is true when the image is marked corrupt.
	Corrupt bool
	// CompressionType is the codec of compressed clusters, "zlib" or "zstd".
	CompressionType string
	// NbSnapshots is the number of internal snapshots.
	NbSnapshots uint32
	// BackingDepth is the number of backing images opened below this one.
	BackingDepth uint32
	// HostSize is the number of bytes of the image file in use: the end of the
	// last cluster allocated (the file may be longer while space is preallocated).
	HostSize uint64
	// BackingFile is the backing file name as stored in the image ("" = none).
	BackingFile string
	// BackingFormat is the backing format as stored in the image ("" = none).
	BackingFormat string
	// EncryptFormat is "luks", "aes" (legacy) or "" when the image is not encrypted.
	EncryptFormat string
}

// cArrayString converts a NUL-terminated C char array to a Go string, never
// reading past the array.
func cArrayString(p *C.char, n int) string {
	b := unsafe.Slice((*byte)(unsafe.Pointer(p)), n)
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// Info returns facts about the image: version, sizes, flags, backing file.
func (img *Image) Info() (Info, error) {
	var ci C.cowdisk_info
	ci.struct_size = C.uint32_t(C.sizeof_cowdisk_info)
	err := img.do("info", func(h *C.cowdisk) C.int {
		return C.cowdisk_get_info(h, &ci)
	})
	if err != nil {
		return Info{}, err
	}
	flags := uint32(ci.flags)
	info := Info{
		Version:       uint32(ci.version),
		VirtualSize:   uint64(ci.virtual_size),
		ClusterSize:   uint32(ci.cluster_size),
		RefcountBits:  uint32(ci.refcount_bits),
		ReadOnly:      flags&C.COWDISK_INFO_READONLY != 0,
		LazyRefcounts: flags&C.COWDISK_INFO_LAZY_REFCOUNTS != 0,
		Dirty:         flags&C.COWDISK_INFO_DIRTY != 0,
		Corrupt:       flags&C.COWDISK_INFO_CORRUPT != 0,
		NbSnapshots:   uint32(ci.nb_snapshots),
		BackingDepth:  uint32(ci.backing_depth),
		HostSize:      uint64(ci.host_size),
		BackingFile:   cArrayString(&ci.backing_file[0], len(ci.backing_file)),
		BackingFormat: cArrayString(&ci.backing_format[0], len(ci.backing_format)),
	}
	switch ci.encrypt_format {
	case C.COWDISK_ENCRYPT_AES:
		info.EncryptFormat = "aes"
	case C.COWDISK_ENCRYPT_LUKS:
		info.EncryptFormat = "luks"
	}
	if c := int(ci.compression_type); c < len(compressionNames) {
		info.CompressionType = compressionNames[c]
	} else {
		info.CompressionType = fmt.Sprintf("unknown(%d)", c)
	}
	return info, nil
}

// checkRange refuses negative offsets and lengths before they reach C as huge
// unsigned numbers.
func (img *Image) checkRange(op string, off, n int64) error {
	if off < 0 {
		return newError(op, img.path, syscall.EINVAL, "invalid argument: negative offset %d", off)
	}
	if n < 0 {
		return newError(op, img.path, syscall.EINVAL, "invalid argument: negative length %d", n)
	}
	return nil
}

// WriteZeroes makes the n guest bytes at off read as zeros, whatever the backing
// chain holds. No alignment is needed. Whole clusters become zero clusters; with
// mayUnmap their host clusters are released too. The range must lie within Size()
// (syscall.EINVAL); a read-only image gives syscall.EROFS.
func (img *Image) WriteZeroes(off, n int64, mayUnmap bool) error {
	const op = "write_zeroes"
	if err := img.checkRange(op, off, n); err != nil {
		return err
	}
	var flags C.uint32_t
	if mayUnmap {
		flags = C.COWDISK_ZEROES_MAY_UNMAP
	}
	return img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_write_zeroes(h, C.uint64_t(off), C.uint64_t(n), flags)
	})
}

// Discard releases the whole clusters of the n guest bytes at off; partial
// clusters at the edges are left unchanged. Released clusters read as zeros (on a
// version 2 image with a backing file: as the backing file). With
// OpenOptions.DiscardUnmap the freed space is punched out of the image file.
func (img *Image) Discard(off, n int64) error {
	const op = "discard"
	if err := img.checkRange(op, off, n); err != nil {
		return err
	}
	return img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_discard(h, C.uint64_t(off), C.uint64_t(n))
	})
}

// Resize changes the virtual size to size bytes (a multiple of 512). Growing
// always works; the new bytes read as zeros. Shrinking fails with syscall.EINVAL
// when data is allocated past the new end, unless force, which discards that
// data; images with internal snapshots cannot shrink (syscall.ENOTSUP).
func (img *Image) Resize(size int64, force bool) error {
	const op = "resize"
	if size < 0 {
		return newError(op, img.path, syscall.EINVAL, "invalid argument: negative size %d", size)
	}
	var flags C.uint32_t
	if force {
		flags = C.COWDISK_RESIZE_FORCE
	}
	img.resizeMu.Lock()
	defer img.resizeMu.Unlock()
	err := img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_resize_ex(h, C.uint64_t(size), flags)
	})
	if err == nil {
		img.size.Store(size)
	}
	return err
}

// Extent is a run of guest bytes with the same status, as listed by Extents.
// The fields mean what they mean in `qemu-img map --output=json`.
type Extent struct {
	// Start is the guest offset of the first byte; Length the number of bytes.
	Start, Length int64
	// Depth is the layer of the backing chain that decides the bytes (0 = this
	// image).
	Depth int
	// Present: some layer allocates the bytes (as data or as zeros). Zero: they
	// read as zeros. Data: they are stored as data. Compressed: they are in a
	// compressed cluster.
	Present, Zero, Data, Compressed bool
	// Offset is the host offset of the first byte in the file of layer Depth,
	// valid when HasOffset (not for unallocated, zero or compressed clusters).
	Offset    int64
	HasOffset bool
}

// continuedBy reports whether next continues e with the same status.
func (e Extent) continuedBy(next Extent) bool {
	if e.Start+e.Length != next.Start || e.Depth != next.Depth || e.Present != next.Present ||
		e.Zero != next.Zero || e.Data != next.Data || e.Compressed != next.Compressed ||
		e.HasOffset != next.HasOffset {
		return false
	}
	return !e.HasOffset || e.Offset+e.Length == next.Offset
}

// extentBatch is the number of extents asked of the library per call.
const extentBatch = 1024

// Extents describes the n guest bytes at off (clamped to Size()) as extents of
// equal status through the whole backing chain, merged like `qemu-img map`: for
// off 0 and n Size() the result equals `qemu-img map --output=json`. An offset
// past Size() is syscall.EINVAL; off == Size() or n == 0 gives no extents.
func (img *Image) Extents(off, n int64) ([]Extent, error) {
	const op = "block_status"
	if err := img.checkRange(op, off, n); err != nil {
		return nil, err
	}
	end := uint64(off) + uint64(n) // no overflow: both are below 2^63
	var out []Extent
	var buf [extentBatch]C.cowdisk_extent
	var count C.size_t
	for pos := uint64(off); pos < end; {
		err := img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_block_status(h, C.uint64_t(pos), C.uint64_t(end-pos),
				&buf[0], extentBatch, &count)
		})
		if err != nil {
			return nil, err
		}
		if count == 0 { // pos is the end of the image
			break
		}
		for _, ce := range buf[:count] {
			flags := uint32(ce.flags)
			e := Extent{
				Start:      int64(ce.start),
				Length:     int64(ce.length),
				Depth:      int(ce.depth),
				Present:    flags&C.COWDISK_EXTENT_PRESENT != 0,
				Zero:       flags&C.COWDISK_EXTENT_ZERO != 0,
				Data:       flags&C.COWDISK_EXTENT_DATA != 0,
				Compressed: flags&C.COWDISK_EXTENT_COMPRESSED != 0,
				HasOffset:  flags&C.COWDISK_EXTENT_OFFSET_VALID != 0,
			}
			if e.HasOffset {
				e.Offset = int64(ce.offset)
			}
			if last := len(out) - 1; last >= 0 && out[last].continuedBy(e) {
				out[last].Length += e.Length
			} else {
				out = append(out, e)
			}
		}
		last := buf[count-1]
		next := uint64(last.start) + uint64(last.length)
		if next <= pos {
			return nil, newError(op, img.path, syscall.EIO,
				"block status made no progress at offset %d", pos)
		}
		pos = next
	}
	return out, nil
}

// Compile-time checks of the io interfaces.
var (
	_ io.ReaderAt = (*Image)(nil)
	_ io.WriterAt = (*Image)(nil)
	_ io.Closer   = (*Image)(nil)
)

// CheckResult is what Check found, with qemu-img check's meaning of each count.
type CheckResult struct {
	Corruptions        uint64 // inconsistencies left that may corrupt data
	Leaks              uint64 // clusters whose refcount exceeds their references
	CheckErrors        uint64 // failures that kept parts of the image from being checked
	CorruptionsFixed   uint64 // corruptions this call repaired
	LeaksFixed         uint64 // leaks this call repaired
	ImageEndOffset     uint64 // end of the last cluster in use
	TotalClusters      uint64 // guest clusters of the virtual disk
	AllocatedClusters  uint64 // guest clusters allocated in the active image
	FragmentedClusters uint64 // allocated clusters not right after the previous one
	CompressedClusters uint64 // compressed clusters in the active image
}

// Repair modes of Check, like qemu-img check -r.
const (
	RepairNone  = 0                            // only report
	RepairLeaks = C.COWDISK_CHECK_REPAIR_LEAKS // give back leaked clusters
	RepairAll   = C.COWDISK_CHECK_REPAIR_ALL   // repair everything repairable
)

// Check checks the image's metadata as qemu-img check does and repairs what
// repair allows (RepairNone, RepairLeaks or RepairAll; a repair needs a
// read-write image, and an image marked corrupt must be opened with
// OpenOptions.Check). Call it again with RepairNone to see what a repair left.
func (img *Image) Check(repair int) (CheckResult, error) {
	var r C.cowdisk_check_result
	r.struct_size = C.uint32_t(unsafe.Sizeof(r))
	err := img.do("check", func(h *C.cowdisk) C.int {
		return C.cowdisk_check(h, C.uint32_t(repair), &r)
	})
	if err != nil {
		return CheckResult{}, err
	}
	return CheckResult{
		Corruptions:        uint64(r.corruptions),
		Leaks:              uint64(r.leaks),
		CheckErrors:        uint64(r.check_errors),
		CorruptionsFixed:   uint64(r.corruptions_fixed),
		LeaksFixed:         uint64(r.leaks_fixed),
		ImageEndOffset:     uint64(r.image_end_offset),
		TotalClusters:      uint64(r.total_clusters),
		AllocatedClusters:  uint64(r.allocated_clusters),
		FragmentedClusters: uint64(r.fragmented_clusters),
		CompressedClusters: uint64(r.compressed_clusters),
	}, nil
}

// AmendOptions says what Amend changes; zero values leave a setting as it is.
type AmendOptions struct {
	Version       uint32 // 2 (compat 0.10) or 3 (compat 1.1)
	LazyRefcounts *bool  // on or off
	RefcountBits  uint32 // 1, 2, 4, ..., 64
}

// Amend changes the image's version, lazy refcounts or refcount width in place,
// as qemu-img amend does (refusing what it refuses). Crash-safe; needs a
// read-write image.
func (img *Image) Amend(opts AmendOptions) error {
	var c C.cowdisk_amend_opts
	c.struct_size = C.uint32_t(unsafe.Sizeof(c))
	c.version = C.uint32_t(opts.Version)
	c.refcount_bits = C.uint32_t(opts.RefcountBits)
	if opts.LazyRefcounts != nil {
		c.lazy_refcounts = 2
		if *opts.LazyRefcounts {
			c.lazy_refcounts = 1
		}
	}
	return img.do("amend", func(h *C.cowdisk) C.int { return C.cowdisk_amend(h, &c) })
}
