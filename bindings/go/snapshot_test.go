package cowdisk

import (
	"bytes"
	"encoding/json"
	"io"
	"syscall"
	"testing"
	"time"
)

// TestSnapshots creates, lists, applies and deletes snapshots; qemu-img sees them.
func TestSnapshots(t *testing.T) {
	requireQemu(t)
	path := mustCreate(t, "s.qcow2", 8<<20, nil)
	img := mustOpen(t, path, nil)
	model := make([]byte, 8<<20)
	mustWrite(t, img, model, pattern(1, 300000), 4096)
	a := append([]byte(nil), model...)
	first, err := img.SnapshotCreate("first", &SnapshotOptions{VMClock: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if first.ID != "1" || first.Name != "first" || first.VMClock != 3*time.Second ||
		first.DiskSize != 8<<20 || first.ICount != -1 || time.Since(first.Date) > time.Hour {
		t.Fatalf("first = %+v", first)
	}
	mustWrite(t, img, model, pattern(2, 300000), 100000)
	n := int64(42)
	second, err := img.SnapshotCreate("second", &SnapshotOptions{ICount: &n})
	if err != nil || second.ID != "2" || second.ICount != 42 {
		t.Fatalf("second = %+v, %v", second, err)
	}
	b := append([]byte(nil), model...)
	list, err := img.Snapshots()
	if err != nil || len(list) != 2 || list[1].Name != "second" {
		t.Fatalf("Snapshots = %+v, %v", list, err)
	}
	if err := img.SnapshotGoto("first"); err != nil {
		t.Fatal(err)
	}
	mustReadEqual(t, img, a, 0)
	if err := img.SnapshotGoto("2"); err != nil {
		t.Fatal(err)
	}
	mustReadEqual(t, img, b, 0)
	wantErrno(t, img.SnapshotGoto("nope"), "snapshot_goto", syscall.ENOENT)
	wantErrno(t, img.SnapshotDelete("nope"), "snapshot_delete", syscall.ENOENT)
	if err := img.SnapshotDelete("first"); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	checkClean(t, path)
	compareRaw(t, path, b)
	out, _ := qemuImg(t, "info", "--output=json", path)
	var info struct {
		Snapshots []struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Snapshots) != 1 || info.Snapshots[0].Name != "second" {
		t.Fatalf("qemu-img info snapshots: %+v", info.Snapshots)
	}
}

// TestVMState streams VM state through an io.WriteCloser in small pieces, records
// it in a snapshot, and reads it back after goto.
func TestVMState(t *testing.T) {
	requireQemu(t)
	path := mustCreate(t, "v.qcow2", 16<<20, &CreateOptions{ClusterSize: 4096})
	img := mustOpen(t, path, nil)
	disk := make([]byte, 16<<20)
	mustWrite(t, img, disk, pattern(3, 1<<20), 0)
	state := pattern(4, 3<<20+123)
	var w io.WriteCloser = img.VMStateWriter()
	for pos, i := 0, 0; pos < len(state); i++ {
		n := []int{33, 4104, 70, 4104, 1}[i%5]
		if pos+n > len(state) {
			n = len(state) - pos
		}
		if k, err := w.Write(state[pos : pos+n]); err != nil || k != n {
			t.Fatalf("Write = %d, %v", k, err)
		}
		pos += n
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	size := w.(*VMStateWriter).Size()
	snap, err := img.SnapshotCreate("vm", &SnapshotOptions{VMStateSize: size})
	if err != nil || snap.VMStateSize != uint64(len(state)) {
		t.Fatalf("SnapshotCreate = %+v, %v", snap, err)
	}
	mustWrite(t, img, nil, pattern(5, 1<<20), 0)
	if err := img.SnapshotGoto("vm"); err != nil {
		t.Fatal(err)
	}
	mustReadEqual(t, img, disk, 0)
	back := make([]byte, len(state))
	for pos := 0; pos < len(back); pos += 1000 {
		end := pos + 1000
		if end > len(back) {
			end = len(back)
		}
		if err := img.LoadVMState(back[pos:end], int64(pos)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(back, state) {
		t.Fatal("VM state differs after goto")
	}
	wantErrno(t, img.SaveVMState([]byte{1}, -1), "save_vmstate", syscall.EINVAL)
	mustClose(t, img)
	checkClean(t, path)
}

// TestSnapshotGotoResizes follows the snapshot's disk size.
func TestSnapshotGotoResizes(t *testing.T) {
	path := mustCreate(t, "r.qcow2", 4<<20, nil)
	img := mustOpen(t, path, nil)
	if _, err := img.SnapshotCreate("small", nil); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(12<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := img.SnapshotGoto("small"); err != nil {
		t.Fatal(err)
	}
	if img.Size() != 4<<20 {
		t.Fatalf("Size after goto = %d", img.Size())
	}
	mustClose(t, img)
	checkClean(t, path)
}

// TestOpenSnapshot opens an internal snapshot read-only: its contents and size.
func TestOpenSnapshot(t *testing.T) {
	path := mustCreate(t, "v.qcow2", 4<<20, nil)
	img := mustOpen(t, path, nil)
	old := pattern(7, 70000)
	model := make([]byte, 4<<20)
	mustWrite(t, img, model, old, 0)
	if _, err := img.SnapshotCreate("before", nil); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(8<<20, false); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(pattern(8, 70000), 0); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)

	snap := mustOpen(t, path, &OpenOptions{ReadOnly: true, Snapshot: "before"})
	if snap.Size() != 4<<20 {
		t.Fatalf("snapshot size %d", snap.Size())
	}
	mustReadEqual(t, snap, model, 0)
	mustClose(t, snap)

	_, err := Open(path, &OpenOptions{Snapshot: "before"})
	wantErrno(t, err, "open", syscall.EINVAL)
	_, err = Open(path, &OpenOptions{ReadOnly: true, Snapshot: "nosuch"})
	wantErrno(t, err, "open", syscall.ENOENT)
}
