package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

// trainData writes Datum lines (token ids only: the copied tiny models carry
// no tokenizer) and returns the file.
func trainData(t *testing.T, lines ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "data.jsonl")
	if err := os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	datumA = `{"model_input": {"tokens": [1, 415, 2936, 9060, 285]}, "loss_fn_inputs": {"target_tokens": [415, 2936, 9060, 285, 1142], "weights": [0, 1, 1, 1, 1]}}`
	datumB = `{"model_input": {"tokens": [1, 272, 17898]}, "loss_fn_inputs": {"target_tokens": [272, 17898, 3914], "weights": [1, 1, 0.5]}}`
)

func TestModelForwardBackwardCmd(t *testing.T) {
	data := trainData(t, datumA, "", datumB)
	for _, extra := range [][]string{nil, {"--adapter", filepath.Join(tinySP, "adapter")}} {
		out, err := runModelCmd(t, append([]string{"forward-backward", "--model", tinySP, "--data", data}, extra...)...)
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		var got struct {
			LossSum  float64     `json:"loss_sum"`
			LossMean float64     `json:"loss_mean"`
			GradNorm float64     `json:"grad_norm"`
			Logprobs [][]float64 `json:"logprobs"`
			Tokens   int         `json:"tokens"`
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if got.Tokens != 8 || len(got.Logprobs) != 2 || len(got.Logprobs[0]) != 5 || len(got.Logprobs[1]) != 3 {
			t.Fatalf("tokens %d, logprobs shape wrong: %s", got.Tokens, out)
		}
		// loss_sum is Σ w·(−logp) over the printed logprobs; loss_mean divides by Σ w = 6.5.
		want := 0.0
		w := [][]float64{{0, 1, 1, 1, 1}, {1, 1, 0.5}}
		for i := range w {
			for j := range w[i] {
				want -= w[i][j] * got.Logprobs[i][j]
			}
		}
		if d := got.LossSum - want; d > 1e-3 || d < -1e-3 || got.LossMean*6.5-got.LossSum > 1e-6 || !(got.GradNorm > 0) {
			t.Fatalf("loss_sum %v (from logprobs %v), loss_mean %v, grad_norm %v", got.LossSum, want, got.LossMean, got.GradNorm)
		}
	}
}

func TestModelTrainCmd(t *testing.T) {
	data := trainData(t, datumA, datumB)
	outDir := t.TempDir()
	out, err := runModelCmd(t, "train", "--model", tinySP, "--data", data, "--steps", "8", "--lr", "0.02", "--rank", "4", "--out", outDir)
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var losses []float64
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var line struct {
			Step         int     `json:"step"`
			LossSum      float64 `json:"loss_sum"`
			LearningRate float64 `json:"learning_rate"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("%v: %s", err, sc.Bytes())
		}
		if line.Step != len(losses)+1 || line.LearningRate != 0.02 {
			t.Fatalf("metrics line %s", sc.Bytes())
		}
		losses = append(losses, line.LossSum)
	}
	if len(losses) != 8 || !(losses[7] < losses[0]) {
		t.Fatalf("losses %v: want 8 steps, falling", losses)
	}
	m, err := trainer.LoadModel(tinySP)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	l, err := trainer.LoadAdapter(outDir, m)
	if err != nil {
		t.Fatalf("saved adapter does not load: %v", err)
	}
	if l.Rank != 4 || len(l.TargetModules) != 7 {
		t.Fatalf("saved adapter rank %d targets %v", l.Rank, l.TargetModules)
	}
}

func TestModelTrainCmdBadInput(t *testing.T) {
	good := trainData(t, datumA)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"train", "--model", tinySP, "--data", good, "--steps", "2", "--lr", "0.01", "--rank", "0", "--out", t.TempDir()}, "rank"},
		{[]string{"train", "--model", tinySP, "--data", good, "--steps", "0", "--lr", "0.01", "--out", t.TempDir()}, "--steps"},
		{[]string{"forward-backward", "--model", tinySP, "--data", trainData(t, `{"model_input": {"tokens": [1, 99999]}, "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [1, 1]}}`)}, "data[0].model_input.tokens[1]"},
		{[]string{"forward-backward", "--model", tinySP, "--data", trainData(t, datumA, `{"model_input": {"tokens": [1]}, "loss_fn_inputs": {"target_tokens": [2], "wieghts": [1]}}`)}, "line 2"},
		{[]string{"forward-backward", "--model", tinySP, "--data", trainData(t, datumA), "--loss", "ppo"}, "data[0].loss_fn_inputs.logprobs"},
	} {
		out, err := runModelCmd(t, tc.args...)
		if !errors.Is(err, trainer.ErrInvalidInput) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v (output %s), want ErrInvalidInput naming %q", tc.args, err, out, tc.want)
		}
	}
}
