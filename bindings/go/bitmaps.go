package cowdisk

/*
#include <stdlib.h>
#include <cowdisk.h>
*/
import "C"

import (
	"runtime"
	"syscall"
	"unsafe"
)

// BitmapInfo describes a persistent dirty bitmap, as listed by Bitmaps.
//
// A dirty bitmap records which parts of the guest disk were written since it was
// added (or last cleared), one bit per Granularity bytes, for incremental backups.
// Bitmaps are QEMU's (the qcow2 bitmaps extension, as `qemu-img bitmap` manages
// them); changes are stored in the image when it is closed.
type BitmapInfo struct {
	// Name is the bitmap's name, unique in the image (at most 1023 bytes).
	Name string
	// Granularity is the number of guest bytes one bit covers.
	Granularity uint64
	// Enabled: writes set the bitmap's bits (QEMU's "auto" flag).
	Enabled bool
	// Inconsistent: the bitmap was marked in use when the image was opened (a
	// crash, or another program has the image open). Its bits cannot be trusted;
	// it is kept as it is and can only be removed (BitmapRemove).
	Inconsistent bool
	// DirtyBytes is the number of bytes covered by set bits (0 when Inconsistent).
	DirtyBytes uint64
}

// DirtyExtent is a run of guest bytes that a bitmap marks all dirty or all clean,
// as listed by DirtyExtents.
type DirtyExtent struct {
	// Start is the guest offset of the first byte; Length the number of bytes.
	Start, Length int64
	// Dirty: the bytes changed since the bitmap was added (or last cleared).
	Dirty bool
}

// Bitmaps lists the image's persistent dirty bitmaps in directory order. It fails
// with syscall.ENOTSUP when the image's bitmaps could not be read (a read-only
// open of an image with a damaged bitmap directory; a read-write open with
// OpenOptions.DropBitmaps gives such bitmaps up and lists none).
func (img *Image) Bitmaps() ([]BitmapInfo, error) {
	const op = "bitmap_list"
	for {
		var count C.size_t
		err := img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_bitmap_list(h, nil, 0, &count)
		})
		if err != nil {
			return nil, err
		}
		n := int(count)
		buf := make([]C.cowdisk_bitmap_info, n+1)
		buf[0].struct_size = C.uint32_t(C.sizeof_cowdisk_bitmap_info)
		err = img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_bitmap_list(h, &buf[0], C.size_t(n), &count)
		})
		if err != nil {
			return nil, err
		}
		if int(count) > n {
			continue // one was added meanwhile
		}
		out := make([]BitmapInfo, int(count))
		for i := range out {
			c := &buf[i]
			flags := uint32(c.flags)
			out[i] = BitmapInfo{
				Name:         cArrayString(&c.name[0], len(c.name)),
				Granularity:  uint64(c.granularity),
				Enabled:      flags&C.COWDISK_BITMAP_ENABLED != 0,
				Inconsistent: flags&C.COWDISK_BITMAP_INCONSISTENT != 0,
				DirtyBytes:   uint64(c.dirty_bytes),
			}
		}
		return out, nil
	}
}

// withName converts name to a C string for fn, freeing it afterwards.
func (img *Image) withName(op, what, name string, fn func(cname *C.char) error) error {
	cname, err := cString(op, img.path, what, name)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cname))
	return fn(cname)
}

// BitmapAdd adds an empty persistent dirty bitmap, like `qemu-img bitmap --add`.
// granularity is the number of guest bytes one bit covers, a power of two from
// 512 bytes to 2 GiB (0 = QEMU's default: the cluster size, within 4 KiB..64 KiB).
// When enabled, writes set its bits from now on. A name already in use or a bad
// granularity is syscall.EINVAL; a version 2 image gives syscall.ENOTSUP and a
// read-only one syscall.EROFS.
func (img *Image) BitmapAdd(name string, granularity uint64, enabled bool) error {
	const op = "bitmap_add"
	var flags C.uint32_t
	if !enabled {
		flags = C.COWDISK_BITMAP_ADD_DISABLED
	}
	return img.withName(op, "bitmap name", name, func(cname *C.char) error {
		return img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_bitmap_add(h, cname, C.uint64_t(granularity), flags)
		})
	})
}

// BitmapRemove removes a bitmap (an inconsistent one too), like `qemu-img bitmap
// --remove`; syscall.ENOENT when there is none of that name.
func (img *Image) BitmapRemove(name string) error {
	const op = "bitmap_remove"
	return img.withName(op, "bitmap name", name, func(cname *C.char) error {
		return img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_bitmap_remove(h, cname)
		})
	})
}

// BitmapClear clears every bit of a bitmap (a new checkpoint starts), like
// `qemu-img bitmap --clear`. An inconsistent bitmap gives syscall.ENOTSUP.
func (img *Image) BitmapClear(name string) error {
	const op = "bitmap_clear"
	return img.withName(op, "bitmap name", name, func(cname *C.char) error {
		return img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_bitmap_clear(h, cname)
		})
	})
}

// BitmapEnable makes a bitmap track writes (enabled true, `qemu-img bitmap
// --enable`) or stop tracking them (false, `--disable`).
func (img *Image) BitmapEnable(name string, enabled bool) error {
	const op = "bitmap_enable"
	var on C.int
	if enabled {
		on = 1
	}
	return img.withName(op, "bitmap name", name, func(cname *C.char) error {
		return img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_bitmap_enable(h, cname, on)
		})
	})
}

// BitmapMerge sets in bitmap name every bit that bitmap srcName of src has set,
// like `qemu-img bitmap --merge`. A nil src means img itself; the granularities
// may differ. syscall.ENOENT when either bitmap does not exist; a closed src fails
// with an error matching ErrClosed.
func (img *Image) BitmapMerge(name string, src *Image, srcName string) error {
	const op = "bitmap_merge"
	return img.withName(op, "bitmap name", name, func(cname *C.char) error {
		return img.withName(op, "source bitmap name", srcName, func(csrc *C.char) error {
			if src == nil || src == img {
				return img.do(op, func(h *C.cowdisk) C.int {
					return C.cowdisk_bitmap_merge(h, cname, nil, csrc)
				})
			}
			return img.doWith(op, src, func(h, sh *C.cowdisk) C.int {
				return C.cowdisk_bitmap_merge(h, cname, sh, csrc)
			})
		})
	})
}

// doWith is do for a call on two distinct images: both handles stay alive while
// it runs. The read locks are taken in address order, so that two merges in
// opposite directions racing two Closes cannot deadlock.
func (img *Image) doWith(op string, other *Image, fn func(h, oh *C.cowdisk) C.int) error {
	first, second := img, other
	if uintptr(unsafe.Pointer(other)) < uintptr(unsafe.Pointer(img)) {
		first, second = other, img
	}
	first.mu.RLock()
	defer first.mu.RUnlock()
	second.mu.RLock()
	defer second.mu.RUnlock()
	h, oh := img.h, other.h
	if h == nil {
		return closedError(op, img.path)
	}
	if oh == nil {
		return closedError(op, other.path)
	}
	err := call(op, img.path, func() C.int { return fn(h, oh) })
	runtime.KeepAlive(img)
	runtime.KeepAlive(other)
	return err
}

// DirtyExtents describes the n guest bytes at off (clamped to Size()) as the dirty
// and clean runs of bitmap name: contiguous, alternating, covering the range. What
// changed since the bitmap was added or cleared is what an incremental backup
// copies. An offset past Size() is syscall.EINVAL; off == Size() or n == 0 gives
// no extents; no such bitmap is syscall.ENOENT, an inconsistent one
// syscall.ENOTSUP.
func (img *Image) DirtyExtents(name string, off, n int64) ([]DirtyExtent, error) {
	const op = "bitmap_extents"
	if err := img.checkRange(op, off, n); err != nil {
		return nil, err
	}
	var out []DirtyExtent
	err := img.withName(op, "bitmap name", name, func(cname *C.char) error {
		end := uint64(off) + uint64(n) // no overflow: both are below 2^63
		var buf [extentBatch]C.cowdisk_extent
		var count C.size_t
		for pos := uint64(off); pos < end; {
			err := img.do(op, func(h *C.cowdisk) C.int {
				return C.cowdisk_bitmap_extents(h, cname, C.uint64_t(pos), C.uint64_t(end-pos),
					&buf[0], extentBatch, &count)
			})
			if err != nil {
				return err
			}
			if count == 0 { // pos is the end of the image
				break
			}
			for _, ce := range buf[:count] {
				e := DirtyExtent{
					Start:  int64(ce.start),
					Length: int64(ce.length),
					Dirty:  uint32(ce.flags)&C.COWDISK_EXTENT_DIRTY != 0,
				}
				if last := len(out) - 1; last >= 0 && out[last].Dirty == e.Dirty &&
					out[last].Start+out[last].Length == e.Start {
					out[last].Length += e.Length
				} else {
					out = append(out, e)
				}
			}
			last := buf[count-1]
			next := uint64(last.start) + uint64(last.length)
			if next <= pos {
				return newError(op, img.path, syscall.EIO,
					"bitmap extents made no progress at offset %d", pos)
			}
			pos = next
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
