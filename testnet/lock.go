package testnet

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ErrDirInUse means another testnet runs in the directory.
var ErrDirInUse = errors.New("testnet directory in use")

// lockFile is the file in a testnet's directory that its testnet holds
// locked; it says the holder's process id.
const lockFile = "testnet.lock"

// dirLock holds a testnet directory: an flock on DIR/testnet.lock, which
// the kernel drops when the holder exits, however it exits, so that a
// crashed testnet leaves no stale lock behind, and a second testnet in the
// same directory (which would clear the first one's data and logs under
// it) is refused instead.
type dirLock struct{ f *os.File }

func lockDir(dir string) (*dirLock, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("testnet dir: %w", err)
	}
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("testnet dir lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			holder := "another process"
			if pid := LockHolder(dir); pid > 0 {
				holder = "process " + strconv.Itoa(pid)
			}
			return nil, fmt.Errorf("%w: %s runs a testnet already (%s): stop it (signal testnet stop --dir %s) or use another --dir",
				ErrDirInUse, dir, holder, dir)
		}
		return nil, fmt.Errorf("testnet dir lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &dirLock{f: f}, nil
}

// release unlocks the directory (closing the file drops the flock).
func (l *dirLock) release() {
	if l != nil {
		_ = l.f.Close()
	}
}

// LockHolder is the process id the lock file of a testnet directory names,
// 0 when it names none. It is the running testnet's only while one holds
// the lock.
func LockHolder(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, lockFile))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}
