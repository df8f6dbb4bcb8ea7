//go:build cowdisk_repo || cowdisk_repo_shared

package cowdisk

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// The go tool decides whether to relink from the sources and the cgo flags, not from
// the contents of build/lib/libcowdisk.a: a rebuilt library would silently leave a
// stale copy inside cached test binaries. `make test-go` passes the library's hash
// as CGO_CFLAGS=-DCOWDISK_LIB_ID=..., which is part of the cache key; this test
// proves the binary was built with the hash of the library now on disk.
func TestLinkedLibraryIsCurrent(t *testing.T) {
	built := linkedLibraryID()
	name := "libcowdisk.a"
	if sharedBuild {
		name = "libcowdisk.so"
	}
	path := filepath.Join("..", "..", "build", "lib", name)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	sum := sha256.Sum256(data)
	current := hex.EncodeToString(sum[:])
	if built == "" {
		t.Fatalf("built without CGO_CFLAGS=-DCOWDISK_LIB_ID=<sha256 of %s>: the go tool "+
			"may have linked a stale library; run `make test-go` or set it (README.md)", path)
	}
	if built != current {
		t.Fatalf("test binary was built for library %s, but %s is now %s", built, path, current)
	}
}
