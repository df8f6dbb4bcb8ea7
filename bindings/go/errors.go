package cowdisk

/*
#include <cowdisk.h>
*/
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"runtime"
	"strings"
	"syscall"
)

// ErrClosed is matched (with errors.Is) by the error returned when a method is
// called on an Image that has already been closed. It is fs.ErrClosed, so code
// written for *os.File keeps working.
var ErrClosed = fs.ErrClosed

// Error is the error type returned by every function and method of this package.
//
// It wraps the errno reported by the C library: errors.Is(err, syscall.ENOENT),
// errors.Is(err, fs.ErrNotExist) and the like work through Unwrap. Use errors.As to
// reach the fields.
type Error struct {
	// Op is the operation that failed: "create", "open", "read", "write", "flush",
	// "close", "info", ...
	Op string
	// Path is the image path the operation was about ("" when none).
	Path string
	// Errno is the positive errno value describing the failure.
	Errno syscall.Errno
	// Msg is the library's description of the failure, as returned by
	// cowdisk_last_error() on the thread that made the call (or a message made by
	// this package for failures detected before calling C).
	Msg string

	closed bool  // the failure is "image already closed"
	cause  error // the context error that cancelled the call, or nil
}

// Error formats the error as "cowdisk <op> <path>: <message>".
func (e *Error) Error() string {
	msg := e.Msg
	// The C messages start with the C function's name ("cowdisk_pread: ..."),
	// which Op already says.
	if strings.HasPrefix(msg, "cowdisk_") {
		if i := strings.Index(msg, ": "); i > 0 && !strings.ContainsAny(msg[:i], " /") {
			msg = msg[i+2:]
		}
	}
	if msg == "" {
		msg = e.Errno.Error()
	}
	var b strings.Builder
	b.WriteString("cowdisk ")
	b.WriteString(e.Op)
	if e.Path != "" {
		b.WriteByte(' ')
		b.WriteString(e.Path)
	}
	b.WriteString(": ")
	b.WriteString(msg)
	return b.String()
}

// Unwrap returns the errno, so that errors.Is(err, syscall.EROFS) works.
func (e *Error) Unwrap() error { return e.Errno }

// Is reports whether the error is the "image closed" error when target is
// ErrClosed, and whether it is a call cancelled by its context when target is
// that context's error (context.Canceled or context.DeadlineExceeded). Other
// targets are matched through Unwrap.
func (e *Error) Is(target error) bool {
	if e.closed && target == ErrClosed {
		return true
	}
	return e.cause != nil && errors.Is(e.cause, target)
}

// Timeout reports whether the error is a timeout (as syscall.Errno does), or a
// call cancelled because its context's deadline passed.
func (e *Error) Timeout() bool {
	if t, ok := e.cause.(interface{ Timeout() bool }); ok && t.Timeout() {
		return true
	}
	return e.Errno.Timeout()
}

// Temporary reports whether the error may go away on retry (as syscall.Errno does).
func (e *Error) Temporary() bool { return e.Errno.Temporary() }

// newError builds an *Error for a failure detected in Go, before any C call.
func newError(op, path string, errno syscall.Errno, format string, args ...interface{}) *Error {
	return &Error{Op: op, Path: path, Errno: errno, Msg: fmt.Sprintf(format, args...)}
}

// closedError is returned by methods called after Close.
func closedError(op, path string) *Error {
	return &Error{Op: op, Path: path, Errno: syscall.EBADF, Msg: "image is closed", closed: true}
}

// call runs fn, which makes one C call returning 0 or a negative errno, and turns
// a failure into an *Error carrying the library's message.
//
// The message is thread-local in C, so the goroutine is locked to its OS thread
// from the call until the message has been copied.
func call(op, path string, fn func() C.int) error {
	runtime.LockOSThread()
	rc := fn()
	var msg string
	if rc < 0 {
		msg = C.GoString(C.cowdisk_last_error())
	}
	runtime.UnlockOSThread()
	if rc >= 0 {
		return nil
	}
	return errorFromCode(op, path, rc, msg)
}

// errorFromCode converts a negative return code and message to an *Error.
func errorFromCode(op, path string, rc C.int, msg string) *Error {
	errno := syscall.Errno(-rc)
	if msg == "" {
		msg = C.GoString(C.cowdisk_strerror(rc))
	}
	return &Error{Op: op, Path: path, Errno: errno, Msg: msg}
}
