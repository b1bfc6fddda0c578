// Package version reports the build's version, set at link time by the Makefile.
package version

import "runtime"

// Version is the Signal release; the Makefile overrides it with
// -ldflags "-X github.com/signal-p2p/signal/internal/version.Version=...".
var Version = "0.1.0-dev"

// Go is the Go toolchain the binary was built with.
func Go() string { return runtime.Version() }
