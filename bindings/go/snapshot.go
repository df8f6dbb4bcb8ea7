package cowdisk

/*
#include <stdlib.h>
#include <cowdisk.h>
*/
import "C"

import (
	"io"
	"runtime"
	"syscall"
	"time"
	"unsafe"
)

// Snapshot describes an internal snapshot, as listed by Snapshots.
type Snapshot struct {
	// ID is the unique id (a decimal number for snapshots QEMU or cowdisk made).
	ID string
	// Name is the snapshot's name (tag); several snapshots may share one.
	Name string
	// VMStateSize is the number of bytes of VM state recorded (0 = disk only).
	VMStateSize uint64
	// Date is when the snapshot was taken.
	Date time.Time
	// VMClock is the guest clock when the snapshot was taken.
	VMClock time.Duration
	// DiskSize is the virtual disk size when the snapshot was taken.
	DiskSize uint64
	// ICount is the record/replay instruction count, or -1 when there is none.
	ICount int64
}

// SnapshotOptions are what SnapshotCreate records besides the disk. A nil
// *SnapshotOptions records a disk-only snapshot.
type SnapshotOptions struct {
	// VMStateSize is the number of bytes of VM state saved (through VMStateWriter
	// or SaveVMState, then finalized) to record in the snapshot; 0 for none.
	VMStateSize uint64
	// VMClock is the guest clock.
	VMClock time.Duration
	// ICount is the record/replay instruction count; nil for none.
	ICount *int64
}

// Snapshots lists the internal snapshots in table order.
func (img *Image) Snapshots() ([]Snapshot, error) {
	const op = "snapshots"
	for {
		var count C.size_t
		err := img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_snapshot_list(h, nil, 0, &count)
		})
		if err != nil {
			return nil, err
		}
		n := int(count)
		buf := make([]C.cowdisk_snapshot_info, n+1)
		buf[0].struct_size = C.uint32_t(C.sizeof_cowdisk_snapshot_info)
		err = img.do(op, func(h *C.cowdisk) C.int {
			return C.cowdisk_snapshot_list(h, &buf[0], C.size_t(n), &count)
		})
		if err != nil {
			return nil, err
		}
		if int(count) > n {
			continue // one was added meanwhile
		}
		out := make([]Snapshot, int(count))
		for i := range out {
			c := &buf[i]
			out[i] = Snapshot{
				ID:          cArrayString(&c.id[0], len(c.id)),
				Name:        cArrayString(&c.name[0], len(c.name)),
				VMStateSize: uint64(c.vm_state_size),
				Date:        time.Unix(int64(c.date_sec), int64(c.date_nsec)),
				VMClock:     time.Duration(c.vm_clock_nsec),
				DiskSize:    uint64(c.disk_size),
				ICount:      int64(c.icount),
			}
		}
		return out, nil
	}
}

// SnapshotCreate creates an internal snapshot named name of the current contents
// and returns it; its id is the next free number. With opts.VMStateSize > 0 the VM
// state saved so far is recorded and dropped from the active image; when saving
// it failed, that error is returned and nothing is recorded. syscall.ENOTSUP means
// the image's refcount width cannot count another reference.
func (img *Image) SnapshotCreate(name string, opts *SnapshotOptions) (Snapshot, error) {
	const op = "snapshot_create"
	cname, err := cString(op, img.path, "snapshot name", name)
	if err != nil {
		return Snapshot{}, err
	}
	defer C.free(unsafe.Pointer(cname))
	var copts *C.cowdisk_snapshot_opts
	if opts != nil {
		var co C.cowdisk_snapshot_opts
		co.struct_size = C.uint32_t(C.sizeof_cowdisk_snapshot_opts)
		co.vm_state_size = C.uint64_t(opts.VMStateSize)
		if opts.VMClock < 0 {
			return Snapshot{}, newError(op, img.path, syscall.EINVAL, "invalid argument: negative VM clock %v", opts.VMClock)
		}
		co.vm_clock_nsec = C.uint64_t(opts.VMClock)
		co.icount = -1
		if opts.ICount != nil {
			co.icount = C.int64_t(*opts.ICount)
		}
		copts = &co
	}
	err = img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_snapshot_create(h, cname, copts)
	})
	if err != nil {
		return Snapshot{}, err
	}
	list, err := img.Snapshots()
	if err != nil {
		return Snapshot{}, err
	}
	for i := len(list) - 1; i >= 0; i-- {
		if list[i].Name == name {
			return list[i], nil
		}
	}
	return Snapshot{}, newError(op, img.path, syscall.ENOENT, "snapshot %q vanished after its creation", name)
}

// SnapshotGoto reverts the image to the snapshot whose id is idOrName, or else the
// first whose name is: its data, its virtual size (Size follows) and its VM state
// (read it with LoadVMState). syscall.ENOENT when there is no such snapshot.
func (img *Image) SnapshotGoto(idOrName string) error {
	const op = "snapshot_goto"
	c, err := cString(op, img.path, "snapshot id or name", idOrName)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(c))
	img.resizeMu.Lock()
	defer img.resizeMu.Unlock()
	err = img.do(op, func(h *C.cowdisk) C.int { return C.cowdisk_snapshot_goto(h, c) })
	if info, ierr := img.Info(); ierr == nil {
		img.size.Store(int64(info.VirtualSize))
	}
	return err
}

// SnapshotDelete deletes the snapshot whose id is idOrName, or else the first whose
// name is. syscall.ENOENT when there is no such snapshot.
func (img *Image) SnapshotDelete(idOrName string) error {
	const op = "snapshot_delete"
	c, err := cString(op, img.path, "snapshot id or name", idOrName)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(c))
	return img.do(op, func(h *C.cowdisk) C.int { return C.cowdisk_snapshot_delete(h, c) })
}

// SaveVMState saves p as VM state at position pos (bytes from the start of the
// state). Sequential saves are buffered by the library and written by background
// threads; call FinalizeVMState to wait for them. After a failure every later save
// fails with the same error.
func (img *Image) SaveVMState(p []byte, pos int64) error {
	const op = "save_vmstate"
	if pos < 0 {
		return newError(op, img.path, syscall.EINVAL, "invalid argument: negative position %d", pos)
	}
	err := img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_save_vmstate(h, bufPtr(p), C.size_t(len(p)), C.uint64_t(pos))
	})
	runtime.KeepAlive(p)
	return err
}

// FinalizeVMState writes the buffered VM state, waits for the background writes
// and returns the first error any save met.
func (img *Image) FinalizeVMState() error {
	return img.do("finalize_vmstate", func(h *C.cowdisk) C.int { return C.cowdisk_finalize_vmstate(h) })
}

// LoadVMState reads len(p) bytes of VM state at position pos (after SnapshotGoto:
// the snapshot's state). Bytes never saved read as zeros.
func (img *Image) LoadVMState(p []byte, pos int64) error {
	const op = "load_vmstate"
	if pos < 0 {
		return newError(op, img.path, syscall.EINVAL, "invalid argument: negative position %d", pos)
	}
	err := img.do(op, func(h *C.cowdisk) C.int {
		return C.cowdisk_load_vmstate(h, bufPtr(p), C.size_t(len(p)), C.uint64_t(pos))
	})
	runtime.KeepAlive(p)
	return err
}

// VMStateWriter saves VM state sequentially from position 0; Close finalizes it.
// Returned by Image.VMStateWriter.
type VMStateWriter struct {
	img    *Image
	pos    int64
	closed bool
}

// VMStateWriter returns an io.WriteCloser that saves VM state from position 0 on.
// Small writes are cheap (the library buffers them into 1 MiB chunks written in the
// background), so there is no need for a bufio.Writer. Close waits for every write
// and returns the first error; then pass Size() as SnapshotOptions.VMStateSize.
func (img *Image) VMStateWriter() *VMStateWriter {
	return &VMStateWriter{img: img}
}

// Write saves p at the current position.
func (w *VMStateWriter) Write(p []byte) (int, error) {
	if w.closed {
		return 0, newError("save_vmstate", w.img.path, syscall.EINVAL, "invalid argument: write after Close")
	}
	if err := w.img.SaveVMState(p, w.pos); err != nil {
		return 0, err
	}
	w.pos += int64(len(p))
	return len(p), nil
}

// Size is the number of bytes written.
func (w *VMStateWriter) Size() uint64 { return uint64(w.pos) }

// Close finalizes the VM state: it waits for every background write and returns
// the first error. Closing twice returns nil.
func (w *VMStateWriter) Close() error {
	if w.closed {
		return nil
	}
	w.closed = true
	return w.img.FinalizeVMState()
}

var _ io.WriteCloser = (*VMStateWriter)(nil)
