package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"

	"github.com/signal-p2p/signal/trainer"
)

func runModelCmd(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"model"}, args...))
	err := root.Execute()
	return out.Bytes(), err
}

var tinySP = filepath.Join("..", "..", "trainer", "testdata", "tiny-sp")

func TestModelTokenize(t *testing.T) {
	dir := filepath.Join("..", "..", "trainer", "tokenizer", "testdata", "sentencepiece-bpe")
	out, err := runModelCmd(t, "tokenize", "--model", dir, "--special", "Hello world")
	if err != nil {
		t.Fatal(err)
	}
	var got struct{ IDs []int }
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(got.IDs) < 2 || got.IDs[0] != 1 {
		t.Errorf("ids = %v, want BOS 1 first", got.IDs)
	}
}

func TestModelSample(t *testing.T) {
	out, err := runModelCmd(t, "sample", "--model", tinySP, "--adapter", filepath.Join(tinySP, "adapter"),
		"--tokens", "1,2,3", "--max-tokens", "5", "--num-samples", "2", "--seed", "9", "--top-k", "20")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Samples []struct {
			Tokens     []int
			Logprobs   []float64
			StopReason string `json:"stop_reason"`
		}
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(got.Samples) != 2 {
		t.Fatalf("%d samples", len(got.Samples))
	}
	for _, s := range got.Samples {
		if len(s.Tokens) != len(s.Logprobs) || len(s.Tokens) == 0 || (s.StopReason != "length" && s.StopReason != "stop") {
			t.Errorf("sample %+v", s)
		}
	}
	bad := [][]string{
		{"sample", "--model", tinySP, "--tokens", "1,x", "--max-tokens", "2"},
		{"sample", "--model", tinySP, "--tokens", "1,99999", "--max-tokens", "2"},
		{"sample", "--model", tinySP, "--tokens", "1", "--max-tokens", "0"},
		{"sample", "--model", tinySP, "--tokens", "1", "--max-tokens", "2", "--top-p", "0"},
		{"sample", "--model", tinySP, "--tokens", "1"},
		{"sample", "--model", tinySP, "--prompt", "hi", "--max-tokens", "2"}, // no tokenizer.json in testdata
	}
	for _, args := range bad {
		if _, err := runModelCmd(t, args...); !errors.Is(err, trainer.ErrInvalidInput) {
			t.Errorf("%v: err = %v, want ErrInvalidInput", args, err)
		}
	}
}
