//go:build !cowdisk_dynamic && !cowdisk_external

package cowdisk

// Default linking: the static library from the repository's build tree, so that
// programs and tests need no LD_LIBRARY_PATH. Build it first with
// `cargo build --release` at the repository root.

/*
#cgo LDFLAGS: ${SRCDIR}/../../target/release/libcowdisk.a -lpthread -ldl -lm -lrt
*/
import "C"
