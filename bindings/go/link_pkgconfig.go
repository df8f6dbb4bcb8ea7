//go:build !cowdisk_repo && !cowdisk_repo_shared

package cowdisk

// Default linking: the installed library, found with pkg-config (`make install`
// writes cowdisk.pc). For a library installed under another prefix, set
// PKG_CONFIG_PATH, e.g. PKG_CONFIG_PATH=/opt/cowdisk/lib/pkgconfig.

/*
#cgo pkg-config: cowdisk
*/
import "C"
