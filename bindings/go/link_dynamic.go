//go:build cowdisk_dynamic && !cowdisk_external

package cowdisk

// With `-tags cowdisk_dynamic`: link libcowdisk.so from the repository's build tree
// and record that directory as the run path. Extra search paths may be given with
// CGO_LDFLAGS.

/*
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -Wl,-rpath,${SRCDIR}/../../target/release -lcowdisk
*/
import "C"
