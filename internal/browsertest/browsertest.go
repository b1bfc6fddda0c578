// Package browsertest runs Debian's headless Chromium for the tests that
// check what a person sees (the dashboard's): finding the browser, running
// it on a page, and keeping screenshots where CI publishes them.
package browsertest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Chromium finds the browser ($SIGNAL_CHROMIUM, else chromium on PATH); it
// skips the test without one locally and fails it in CI, where the
// Makefile installs Debian's chromium.
func Chromium(t testing.TB) string {
	t.Helper()
	for _, name := range []string{os.Getenv("SIGNAL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"} {
		if name == "" {
			continue
		}
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium not found: install Debian's chromium (APT_PKGS) or set SIGNAL_CHROMIUM")
	}
	t.Skip("chromium not found; install it (apt-get install chromium) to run the browser tests")
	return ""
}

// Artifacts is where screenshots go: $SIGNAL_ARTIFACTS when set (CI
// publishes it), else the test's temporary directory.
func Artifacts(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("SIGNAL_ARTIFACTS")
	if dir == "" {
		return t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Headless runs Chromium on url in a window of size ("width,height") with
// extra arguments (--dump-dom, --screenshot=...) and returns its stdout.
func Headless(ctx context.Context, t testing.TB, bin, url, size string, args ...string) []byte {
	t.Helper()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--hide-scrollbars", "--user-data-dir=" + t.TempDir(), "--window-size=" + size}
	cmd := exec.CommandContext(ctx, bin, append(append(base, args...), url)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
	}
	return out.Bytes()
}

// Screenshot keeps a screenshot of url at size as Artifacts/name and fails
// the test when what Chromium wrote is not a rendered page.
func Screenshot(ctx context.Context, t testing.TB, bin, url, size, name string) {
	t.Helper()
	shot := filepath.Join(Artifacts(t), name)
	Headless(ctx, t, bin, url, size, "--screenshot="+shot)
	png, err := os.ReadFile(shot)
	if err != nil {
		t.Fatal(err)
	}
	if len(png) < 10_000 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Fatalf("screenshot %s: %d bytes, not a rendered page", shot, len(png))
	}
	t.Logf("screenshot: %s (%d bytes)", shot, len(png))
}
