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

// Oracles. The hand-written PyTorch references run on $SIGNAL_PYTHON
// (default /usr/bin/python3, Debian's torch 1.13); hf_ref.py runs Hugging
// Face transformers + PEFT on $SIGNAL_HF_PYTHON, the pinned environment
// scripts/pyenv.sh builds (make test sets it). Both answer the same
// requests, so every comparison is made against the model code users run
// as well as against the formulas written out by hand.
const (
	refPyTorch = "pytorch"
	refHF      = "transformers"
)

// references returns the oracles this machine has, hand-written one first;
// handWritten names its script. A missing oracle skips its comparisons
// locally and fails the test in CI, where both must be present.
func references(t *testing.T, handWritten string) []reference {
	t.Helper()
	py := os.Getenv("SIGNAL_PYTHON")
	if py == "" {
		py = "/usr/bin/python3"
	}
	candidates := []struct {
		ref    reference
		env    string
		probes string
	}{
		{reference{refPyTorch, py, handWritten}, "SIGNAL_PYTHON", "import torch, numpy"},
		{reference{refHF, os.Getenv("SIGNAL_HF_PYTHON"), "hf_ref.py"}, "SIGNAL_HF_PYTHON", "import torch, transformers, peft"},
	}
	var out []reference
	for _, c := range candidates {
		if c.ref.python == "" {
			missing(t, c.ref.name+": $"+c.env+" is not set (make test sets it: scripts/pyenv.sh)")
			continue
		}
		if err := exec.Command(c.ref.python, "-c", c.probes).Run(); err != nil {
			missing(t, c.ref.name+": "+c.ref.python+" cannot "+c.probes+": "+err.Error())
			continue
		}
		out = append(out, c.ref)
	}
	if len(out) == 0 {
		t.Skip("no reference interpreter on this machine")
	}
	return out
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
