package testnet

import "syscall"

// childAttrs puts a member in its own process group (a terminal's Ctrl-C
// reaches only the parent, which stops members in order) and has the
// kernel kill it if the parent dies, so a crashed parent leaves no orphans.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
