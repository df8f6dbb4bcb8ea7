package cowdisk

import (
	"bytes"
	"encoding/json"
	"fmt"
	"syscall"
	"testing"
)

// TestWriteCompressedAt writes compressed clusters (zlib and zstd, cache on and
// off) and lets qemu-img check and compare the result; misaligned and
// overwriting compressed writes fail with EINVAL.
func TestWriteCompressedAt(t *testing.T) {
	requireQemu(t)
	const cs = 65536
	const size = 20*cs + 4096 // the last cluster is partial
	data := make([]byte, size)
	copy(data, bytes.Repeat([]byte("compressed clusters, packed back to back. "), size/42))
	copy(data[5*cs:], pattern(3, cs)) // does not compress: stored as a normal cluster
	for i := 8 * cs; i < 10*cs; i++ {
		data[i] = 0
	}
	for _, kind := range []string{"zlib", "zstd"} {
		for _, noCache := range []bool{false, true} {
			path := mustCreate(t, fmt.Sprintf("%s-%v.qcow2", kind, noCache), size, &CreateOptions{CompressionType: kind})
			img := mustOpen(t, path, &OpenOptions{NoCompressedCache: noCache})
			if n, err := img.WriteCompressedAt(data[:12*cs], 0); err != nil || n != 12*cs {
				t.Fatalf("%s: WriteCompressedAt = %d, %v", kind, n, err)
			}
			for off := 12 * cs; off < size; off += cs {
				end := off + cs
				if end > size {
					end = size
				}
				if _, err := img.WriteCompressedAt(data[off:end], int64(off)); err != nil {
					t.Fatalf("%s: WriteCompressedAt at %d: %v", kind, off, err)
				}
			}
			mustReadEqual(t, img, data, 0)
			_, err := img.WriteCompressedAt(data[:cs], 0)
			wantErrno(t, err, "write_compressed", syscall.EINVAL)
			_, err = img.WriteCompressedAt(data[:cs], 512)
			wantErrno(t, err, "write_compressed", syscall.EINVAL)
			_, err = img.WriteCompressedAt(data[:cs], -1)
			wantErrno(t, err, "write_compressed", syscall.EINVAL)
			// A normal write into a compressed cluster copies it on write.
			mustWrite(t, img, data, []byte("overwritten"), 3*cs+100)
			mustReadEqual(t, img, data, 0)
			mustClose(t, img)
			checkClean(t, path)
			compareRaw(t, path, data)
			out, code := qemuImg(t, "check", "--output=json", path)
			if code != 0 {
				t.Fatalf("qemu-img check: %s", out)
			}
			var check map[string]any
			if err := json.Unmarshal([]byte(out), &check); err != nil {
				t.Fatal(err)
			}
			if n, _ := check["compressed-clusters"].(float64); n < 15 {
				t.Errorf("%s: %v compressed clusters, want at least 15: %s", kind, n, out)
			}
		}
	}
}
