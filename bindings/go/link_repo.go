//go:build cowdisk_repo && !cowdisk_repo_shared

package cowdisk

// With `-tags cowdisk_repo`: the static library of the repository's build tree
// (build/lib/libcowdisk.a, made by `make`), so that programs and tests need no
// installed library and no LD_LIBRARY_PATH. The go tool does not look inside that
// file when it decides whether to relink: build through `make test-go`, or set
// CGO_CFLAGS=-DCOWDISK_LIB_ID=<sha256 of the library> yourself (see README.md,
// "Building inside the repository"); TestLinkedLibraryIsCurrent checks it.

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#cgo LDFLAGS: ${SRCDIR}/../../build/lib/libcowdisk.a -lgcc_s -lutil -lrt -lpthread -lm -ldl
*/
import "C"

// sharedBuild tells TestLinkedLibraryIsCurrent which library this build links.
const sharedBuild = false
