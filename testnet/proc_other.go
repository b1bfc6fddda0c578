//go:build !linux

package testnet

import "syscall"

// childAttrs puts a member in its own process group, so that a terminal's
// Ctrl-C reaches only the parent, which stops members in order.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
