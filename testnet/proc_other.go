//go:build !linux

package testnet

import "syscall"

// childAttrs puts a member in its own process group, so that a terminal's
// Ctrl-C reaches only the parent, which stops members in order.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// killTree SIGKILLs pid (its descendants are found on Linux only).
func killTree(pid int) { _ = syscall.Kill(pid, syscall.SIGKILL) }

// descendants is empty: only Linux's /proc says who started whom.
func descendants(int) []int { return nil }
