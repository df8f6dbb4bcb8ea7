//go:build cowdisk_repo_shared

package cowdisk

// With `-tags cowdisk_repo_shared`: the shared library of the repository's build
// tree (build/lib/libcowdisk.so, made by `make`), with that directory as run path.
// As with cowdisk_repo, set CGO_CFLAGS=-DCOWDISK_LIB_ID=... so that the go tool
// relinks when the library changes.

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#cgo LDFLAGS: -L${SRCDIR}/../../build/lib -Wl,-rpath,${SRCDIR}/../../build/lib -lcowdisk
*/
import "C"

// sharedBuild tells TestLinkedLibraryIsCurrent which library this build links.
const sharedBuild = true
