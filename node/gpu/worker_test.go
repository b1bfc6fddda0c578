package gpu

import (
	"os/exec"
	"path/filepath"
	"testing"
)

// TestWorkerPythonSuite runs the worker's own unittest suite (numerics
// against a float64 reference and finite differences, AdamW against
// torch.optim.AdamW, state round trips, sampling, bad input, the socket
// server) so that `go test ./...` covers the Python side too.
func TestWorkerPythonSuite(t *testing.T) {
	for _, py := range pythonsWithTorch(t) {
		t.Run(filepath.Base(filepath.Dir(filepath.Dir(py)))+"/"+filepath.Base(py), func(t *testing.T) {
			cmd := exec.Command(py, "-m", "unittest", "discover", "-s", "tests", "-v")
			cmd.Dir = "worker"
			cmd.Env = append(cmd.Environ(), "PYTHONDONTWRITEBYTECODE=1", "OMP_NUM_THREADS=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("worker tests on %s failed: %v\n%s", py, err, out)
			}
			t.Logf("%s", out)
		})
	}
}
