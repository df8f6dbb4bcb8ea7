package cowdisk

/*
#include <stdlib.h>
#include <stdint.h>
#include <cowdisk.h>

// The trampoline of convert_callback.go (declared by cgo in _cgo_export.h,
// which this file cannot include).
extern int cowdiskGoProgress(void *opaque, uint64_t done, uint64_t total);
*/
import "C"

import (
	"context"
	"errors"
	"math"
	"runtime/cgo"
	"syscall"
	"unsafe"
)

// ConvertOptions are the settings of Convert. The zero value (and a nil
// *ConvertOptions) converts like `qemu-img convert -O qcow2` with the source
// format probed, except that the target is flushed at the end.
type ConvertOptions struct {
	// SourceFormat is the source's format: "qcow2", "raw", or "" to probe it.
	SourceFormat string
	// TargetFormat is the target's format: "qcow2" (or "", the default) or "raw".
	TargetFormat string
	// Create holds the settings of a new qcow2 target (nil = defaults). Its
	// BackingFile and BackingFormat are used when the fields below are empty.
	Create *CreateOptions
	// Compressed writes compressed clusters (qcow2 targets; qemu-img convert -c),
	// with Create.CompressionType's codec.
	Compressed bool
	// OutOfOrder writes chunks as soon as they are ready instead of in guest
	// order (qemu-img convert -W).
	OutOfOrder bool
	// ExistingTarget writes into the existing image at dst instead of creating
	// it (qemu-img convert -n). After a failure it keeps what was written.
	ExistingTarget bool
	// TargetIsZero says that the existing target already reads as zeros, so zero
	// runs are not written (--target-is-zero; needs ExistingTarget).
	TargetIsZero bool
	// SourceDirect reads the source with O_DIRECT (qemu-img convert -T none).
	SourceDirect bool
	// TargetDirect writes the target with O_DIRECT (qemu-img convert -t none).
	TargetDirect bool
	// ForceShare opens the source even while another process writes it (-U).
	ForceShare bool
	// NoSparse turns zero detection off: every byte is copied as data (-S 0).
	NoSparse bool
	// MinSparse is the length in bytes of the shortest zero run inside data that
	// is not written as data (-S; 0 = 4096).
	MinSparse uint64
	// TargetNoFlush never flushes the target (-t unsafe, qemu-img's default):
	// the copy is then not durable when Convert returns.
	TargetNoFlush bool
	// Bitmaps carries the source's persistent dirty bitmaps into the qcow2 target
	// (qemu-img convert --bitmaps); an inconsistent one fails the convert unless
	// SkipBrokenBitmaps.
	Bitmaps bool
	// SkipBrokenBitmaps leaves inconsistent bitmaps out (--skip-broken-bitmaps).
	SkipBrokenBitmaps bool
	// Workers is the number of threads that copy, 1 to 16 (0 = 8).
	Workers int
	// Secret is the passphrase of an encrypted source (and of an encrypted existing
	// target when Create.Secret is empty). A new encrypted target takes its
	// passphrase from Create.Secret.
	Secret []byte
	// Snapshot is the id or name of an internal snapshot of the source to
	// convert instead of its current contents ("" = none).
	Snapshot string
	// BackingFile is the backing file of the new target (qemu-img convert -B):
	// only what the source's top image allocates is copied ("" = none, or
	// Create.BackingFile).
	BackingFile string
	// BackingFormat is BackingFile's format, "qcow2" or "raw" ("" = probe, or
	// Create.BackingFormat).
	BackingFormat string
	// Progress, if not nil, is called with the bytes done and the total, at least
	// once at the start and once at the end, done never going backwards. It runs
	// on the goroutine that called Convert. A panic in it stops the copy and is
	// raised again by Convert; it must not call runtime.Goexit (t.FailNow).
	Progress func(done, total uint64)
}

// Convert copies the guest contents of the image at src (qcow2 with its backing
// chain, or raw) into a new image at dst, as `qemu-img convert` does: several
// workers read in parallel, zero runs are skipped, and writes reach the target in
// guest order unless opts.OutOfOrder. A nil opts uses the defaults.
//
// A new target replaces any file at dst; a failed or cancelled convert removes
// it. Cancelling ctx stops the copy (within about 100 ms): the error then
// matches ctx.Err() (context.Canceled or context.DeadlineExceeded) and
// syscall.ECANCELED. A ctx already done when Convert is called fails at once,
// leaving dst untouched. Bad options are syscall.EINVAL; an image another process
// holds is syscall.EBUSY.
func Convert(ctx context.Context, src, dst string, opts *ConvertOptions) error {
	const op = "convert"
	if opts == nil {
		opts = &ConvertOptions{}
	}
	var strs cStrings
	defer strs.free()
	csrc, err := strs.add(op, src, "source path", src)
	if err != nil {
		return err
	}
	cdst, err := strs.add(op, src, "target path", dst)
	if err != nil {
		return err
	}

	var co C.cowdisk_convert_opts
	co.struct_size = C.uint32_t(C.sizeof_cowdisk_convert_opts)
	flag := func(on bool, f C.uint32_t) {
		if on {
			co.flags |= f
		}
	}
	switch opts.SourceFormat {
	case "":
	case "qcow2":
		co.flags |= C.COWDISK_CONVERT_SOURCE_QCOW2
	case "raw":
		co.flags |= C.COWDISK_CONVERT_SOURCE_RAW
	default:
		return newError(op, src, syscall.EINVAL,
			"invalid argument: unknown source format %q (use \"qcow2\", \"raw\" or \"\")", opts.SourceFormat)
	}
	switch opts.TargetFormat {
	case "", "qcow2":
	case "raw":
		co.flags |= C.COWDISK_CONVERT_TARGET_RAW
	default:
		return newError(op, src, syscall.EINVAL,
			"invalid argument: unknown target format %q (use \"qcow2\" or \"raw\")", opts.TargetFormat)
	}
	flag(opts.Compressed, C.COWDISK_CONVERT_COMPRESSED)
	flag(opts.OutOfOrder, C.COWDISK_CONVERT_OUT_OF_ORDER)
	flag(opts.ExistingTarget, C.COWDISK_CONVERT_EXISTING_TARGET)
	flag(opts.TargetIsZero, C.COWDISK_CONVERT_TARGET_IS_ZERO)
	flag(opts.SourceDirect, C.COWDISK_CONVERT_SOURCE_DIRECT)
	flag(opts.TargetDirect, C.COWDISK_CONVERT_TARGET_DIRECT)
	flag(opts.ForceShare, C.COWDISK_CONVERT_FORCE_SHARE)
	flag(opts.NoSparse, C.COWDISK_CONVERT_NO_SPARSE)
	flag(opts.TargetNoFlush, C.COWDISK_CONVERT_TARGET_NO_FLUSH)
	flag(opts.Bitmaps, C.COWDISK_CONVERT_BITMAPS)
	flag(opts.SkipBrokenBitmaps, C.COWDISK_CONVERT_SKIP_BROKEN_BITMAPS)
	if opts.Workers < 0 || uint64(opts.Workers) > math.MaxUint32 {
		return newError(op, src, syscall.EINVAL, "invalid argument: %d workers", opts.Workers)
	}
	co.workers = C.uint32_t(opts.Workers)
	co.min_sparse = C.uint64_t(opts.MinSparse)
	if opts.Create != nil {
		// co lives in Go memory and is passed to C, so what it points to must
		// not: the create options go to C memory.
		cc := (*C.cowdisk_create_opts)(C.calloc(1, C.sizeof_cowdisk_create_opts))
		if cc == nil {
			return newError(op, src, syscall.ENOMEM, "out of memory")
		}
		defer C.free(unsafe.Pointer(cc))
		if err := fillCreateOpts(op, src, opts.Create, cc, &strs); err != nil {
			return err
		}
		co.create = cc
	}
	for _, s := range []struct {
		what, val string
		dst       **C.char
	}{
		{"snapshot", opts.Snapshot, &co.snapshot},
		{"backing file name", opts.BackingFile, &co.backing_file},
		{"backing format", opts.BackingFormat, &co.backing_format},
	} {
		if s.val != "" {
			if *s.dst, err = strs.add(op, src, s.what, s.val); err != nil {
				return err
			}
		}
	}
	secret, secretLen := strs.addSecret(opts.Secret)
	return runWithProgress(ctx, op, src, opts.Progress, func(cb C.cowdisk_progress_fn, opaque unsafe.Pointer) C.int {
		co.progress, co.opaque = cb, opaque
		co.secret, co.secret_len = secret, secretLen
		return C.cowdisk_convert(csrc, cdst, &co)
	})
}

// CompareOptions are the settings of Compare; the zero value (and nil) probes
// both formats and ignores a size difference when the extra part reads as zeros.
type CompareOptions struct {
	// Strict makes a size difference a difference (qemu-img compare -s).
	Strict bool
	// FirstRaw and SecondRaw say that the first or second image is a raw file,
	// which is otherwise probed (qemu-img compare -f raw, -F raw).
	FirstRaw, SecondRaw bool
	// ForceShare opens the images even while other processes write them (-U).
	ForceShare bool
}

// Compare compares the guest contents of the images at a and b (qcow2 with their
// backing chains, or raw), reading both in parallel, as `qemu-img compare` does.
// It returns identical true when they read the same (the larger image's extra
// part reading as zeros, unless opts.Strict). Otherwise mismatch is the offset of
// the 512-byte sector that holds the first difference, as qemu-img reports it —
// or, in strict mode with different sizes, the smaller size. A nil opts uses the
// defaults.
func Compare(a, b string, opts *CompareOptions) (identical bool, mismatch uint64, err error) {
	const op = "compare"
	if opts == nil {
		opts = &CompareOptions{}
	}
	var strs cStrings
	defer strs.free()
	ca, err := strs.add(op, a, "first path", a)
	if err != nil {
		return false, 0, err
	}
	cb, err := strs.add(op, a, "second path", b)
	if err != nil {
		return false, 0, err
	}
	var flags C.uint32_t
	if opts.Strict {
		flags |= C.COWDISK_COMPARE_STRICT
	}
	if opts.FirstRaw {
		flags |= C.COWDISK_COMPARE_FIRST_RAW
	}
	if opts.SecondRaw {
		flags |= C.COWDISK_COMPARE_SECOND_RAW
	}
	if opts.ForceShare {
		flags |= C.COWDISK_COMPARE_FORCE_SHARE
	}
	var rc C.int
	var at C.uint64_t
	err = call(op, a, func() C.int {
		rc = C.cowdisk_compare(ca, cb, flags, &at)
		return rc
	})
	if err != nil {
		return false, 0, err
	}
	if rc == 0 {
		return true, 0, nil
	}
	return false, uint64(at), nil
}

// CommitOptions are the settings of Commit; nil is the same as &CommitOptions{}.
type CommitOptions struct {
	// Base is the image of the backing chain to commit into ("" = the image's
	// backing file; qemu-img commit -b).
	Base string
	// Keep leaves the committed data in the image (qemu-img commit -d). Without
	// it, committing into the backing file (Base "") then empties the image, so
	// that it reads through its backing file.
	Keep bool
	// Progress is called as ConvertOptions.Progress is.
	Progress func(done, total uint64)
}

// Commit copies what the image at path and the layers above the base allocate
// into the base (by default its backing file), then flushes the base, as
// `qemu-img commit` does. The image must have a backing file and Base must be in
// its chain (syscall.EINVAL otherwise).
//
// Cancelling ctx stops the commit with an error that matches ctx.Err() and
// syscall.ECANCELED; the base keeps what was written, which the image still holds
// too, so the chain reads as before.
func Commit(ctx context.Context, path string, opts *CommitOptions) error {
	const op = "commit"
	if opts == nil {
		opts = &CommitOptions{}
	}
	var strs cStrings
	defer strs.free()
	cpath, err := strs.add(op, path, "path", path)
	if err != nil {
		return err
	}
	var cbase *C.char
	if opts.Base != "" {
		if cbase, err = strs.add(op, path, "base", opts.Base); err != nil {
			return err
		}
	}
	var flags C.uint32_t
	if opts.Keep {
		flags |= C.COWDISK_COMMIT_KEEP
	}
	return runWithProgress(ctx, op, path, opts.Progress, func(cb C.cowdisk_progress_fn, opaque unsafe.Pointer) C.int {
		return C.cowdisk_commit(cpath, cbase, flags, cb, opaque)
	})
}

// RebaseOptions are the settings of Rebase; nil is the same as &RebaseOptions{}.
type RebaseOptions struct {
	// BackingFormat is the new backing file's format, "qcow2" or "raw"
	// ("" = probe; qemu-img rebase -F).
	BackingFormat string
	// Unsafe only changes the backing file name stored in the image, copying
	// nothing (qemu-img rebase -u).
	Unsafe bool
	// Progress is called as ConvertOptions.Progress is.
	Progress func(done, total uint64)
}

// Rebase makes backing the backing file of the image at path ("" = none; a
// relative name is resolved against the image's directory), as `qemu-img rebase`
// does: every cluster the image does not allocate itself that reads differently
// through the new backing file is first written into the image, so that the
// image reads the same afterwards. With opts.Unsafe only the name changes.
//
// Cancelling ctx stops the rebase with an error that matches ctx.Err() and
// syscall.ECANCELED; the image then still names its old backing file and reads
// as before.
func Rebase(ctx context.Context, path, backing string, opts *RebaseOptions) error {
	const op = "rebase"
	if opts == nil {
		opts = &RebaseOptions{}
	}
	var strs cStrings
	defer strs.free()
	cpath, err := strs.add(op, path, "path", path)
	if err != nil {
		return err
	}
	var cbacking, cformat *C.char
	if backing != "" {
		if cbacking, err = strs.add(op, path, "backing file name", backing); err != nil {
			return err
		}
	}
	if opts.BackingFormat != "" {
		if cformat, err = strs.add(op, path, "backing format", opts.BackingFormat); err != nil {
			return err
		}
	}
	var flags C.uint32_t
	if opts.Unsafe {
		flags |= C.COWDISK_REBASE_UNSAFE
	}
	return runWithProgress(ctx, op, path, opts.Progress, func(cb C.cowdisk_progress_fn, opaque unsafe.Pointer) C.int {
		return C.cowdisk_rebase(cpath, cbacking, cformat, flags, cb, opaque)
	})
}

// progressCall is the state of one call's progress callback, reached from the
// C callback through a cgo.Handle.
type progressCall struct {
	ctx context.Context
	fn  func(done, total uint64) // may be nil

	// Set by report: stopped once it asked the call to stop; panicked when fn
	// panicked, in which case runWithProgress panics again with panicValue once
	// the C call has returned.
	stopped    bool
	panicked   bool
	panicValue any
}

// report passes progress to the user's function and says whether to go on:
// false once ctx is done or fn has panicked. After that fn is not called again.
func (p *progressCall) report(done, total uint64) (goOn bool) {
	if p.stopped {
		return false
	}
	if p.fn != nil {
		returned := false
		defer func() {
			if !returned {
				p.stopped, p.panicked, p.panicValue = true, true, recover()
				goOn = false
			}
		}()
		p.fn(done, total)
		returned = true
	}
	if p.ctx.Err() != nil {
		p.stopped = true
		return false
	}
	return true
}

// runWithProgress makes one C call that takes a progress callback. The callback
// is installed when there is a progress function or ctx can be cancelled; it
// stops the call once ctx is done. A ctx already done fails without calling C.
func runWithProgress(ctx context.Context, op, path string, fn func(done, total uint64),
	c func(cb C.cowdisk_progress_fn, opaque unsafe.Pointer) C.int) error {
	if ctx == nil {
		return newError(op, path, syscall.EINVAL, "invalid argument: nil context")
	}
	if err := ctx.Err(); err != nil {
		return &Error{Op: op, Path: path, Errno: syscall.ECANCELED,
			Msg: "not started: " + err.Error(), cause: err}
	}
	var p *progressCall
	var cb C.cowdisk_progress_fn
	var opaque unsafe.Pointer
	if fn != nil || ctx.Done() != nil {
		p = &progressCall{ctx: ctx, fn: fn}
		h := cgo.NewHandle(p)
		defer h.Delete()
		// The handle is an integer: C gets a pointer to a copy of it in C memory.
		slot := (*C.uintptr_t)(C.malloc(C.sizeof_uintptr_t))
		if slot == nil {
			return newError(op, path, syscall.ENOMEM, "out of memory")
		}
		defer C.free(unsafe.Pointer(slot))
		*slot = C.uintptr_t(h)
		cb = C.cowdisk_progress_fn(C.cowdiskGoProgress)
		opaque = unsafe.Pointer(slot)
	}
	err := call(op, path, func() C.int { return c(cb, opaque) })
	if p == nil {
		return err
	}
	if p.panicked {
		panic(p.panicValue)
	}
	var ce *Error
	if errors.As(err, &ce) && ce.Errno == syscall.ECANCELED {
		if cause := ctx.Err(); cause != nil {
			ce.cause = cause
			ce.Msg += ": " + cause.Error()
		}
	}
	return err
}
