package trainer

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// reference is one oracle the engine is compared with: an interpreter and
// a script under reference/.
type reference struct {
	name   string // in subtest names
	python string
	script string
}

// The oracle is Hugging Face transformers + PEFT (reference/hf_ref.py) on
// $SIGNAL_HF_PYTHON, the pinned environment scripts/pyenv.sh builds (make
// test sets it): the model code users run judges the engine. Only Signal's
// own losses (importance sampling, PPO) are written out by hand
// (train_ref.py's datum_loss), since no library defines them.
const refHF = "transformers"

// references returns the oracles this machine has. A missing one skips
// the comparisons locally and fails the test in CI.
func references(t *testing.T) []reference {
	t.Helper()
	py := os.Getenv("SIGNAL_HF_PYTHON")
	const probe = "import torch, transformers, peft"
	switch {
	case py == "":
		missing(t, "$SIGNAL_HF_PYTHON is not set (make test sets it: scripts/pyenv.sh)")
	case exec.Command(py, "-c", probe).Run() != nil:
		missing(t, py+" cannot "+probe)
	default:
		return []reference{{refHF, py, "hf_ref.py"}}
	}
	t.Skip("no transformers + PEFT environment on this machine")
	return nil
}

func missing(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("reference missing in CI: %s", why)
	}
	t.Logf("reference skipped: %s", why)
}

// runRef runs ref's script with req as JSON on stdin (args after the
// script, if any) and decodes its answer into out.
func runRef(t *testing.T, ref reference, args []string, req, out any) {
	t.Helper()
	in, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command(ref.python, append([]string{filepath.Join("reference", ref.script)}, args...)...)
	c.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	raw, err := c.Output()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", ref.script, args, err, stderr.String())
	}
	if err := json.Unmarshal(raw, out); err != nil {
		t.Fatalf("%s %v answer: %v\n%s", ref.script, args, err, raw)
	}
}
