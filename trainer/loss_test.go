package trainer

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestValidateData(t *testing.T) {
	good := func() Datum {
		return Datum{Tokens: []int{1, 2, 3}, TargetTokens: []int{2, 3, 4}, Weights: []float32{0, 1, 1},
			Logprobs: []float32{-1, -2, -3}, Advantages: []float32{0, 1, -1}}
	}
	ce, _ := parseLoss(LossCrossEntropy, nil)
	ppo, _ := parseLoss(LossPPO, nil)
	if err := validateData([]Datum{good(), good()}, ce, 10, 8); err != nil {
		t.Fatalf("valid data rejected: %v", err)
	}
	if err := validateData([]Datum{good()}, ppo, 10, 8); err != nil {
		t.Fatalf("valid RL data rejected: %v", err)
	}
	for _, tc := range []struct {
		name string
		ls   lossSpec
		mod  func(*Datum)
		want string // the datum index and field the error must name
	}{
		{"empty tokens", ce, func(d *Datum) { d.Tokens = nil }, "data[1].model_input.tokens"},
		{"over context", ce, func(d *Datum) {
			d.Tokens = make([]int, 9)
			d.TargetTokens, d.Weights = make([]int, 9), make([]float32, 9)
		}, "data[1].model_input.tokens"},
		{"target length", ce, func(d *Datum) { d.TargetTokens = d.TargetTokens[:2] }, "data[1].loss_fn_inputs.target_tokens"},
		{"weights length", ce, func(d *Datum) { d.Weights = d.Weights[:1] }, "data[1].loss_fn_inputs.weights"},
		{"weights missing", ce, func(d *Datum) { d.Weights = nil }, "data[1].loss_fn_inputs.weights"},
		{"token id", ce, func(d *Datum) { d.Tokens[2] = 10 }, "data[1].model_input.tokens[2]"},
		{"negative id", ce, func(d *Datum) { d.Tokens[0] = -1 }, "data[1].model_input.tokens[0]"},
		{"target id", ce, func(d *Datum) { d.TargetTokens[1] = 99 }, "data[1].loss_fn_inputs.target_tokens[1]"},
		{"NaN weight", ce, func(d *Datum) { d.Weights[1] = float32(math.NaN()) }, "data[1].loss_fn_inputs.weights[1]"},
		{"inf advantage", ppo, func(d *Datum) { d.Advantages[2] = float32(math.Inf(-1)) }, "data[1].loss_fn_inputs.advantages[2]"},
		{"RL without logprobs", ppo, func(d *Datum) { d.Logprobs = nil }, "data[1].loss_fn_inputs.logprobs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := good()
			tc.mod(&d)
			err := validateData([]Datum{good(), d}, tc.ls, 10, 8)
			if !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want an input error naming %s", err, tc.want)
			}
		})
	}
	if err := validateData(nil, ce, 10, 8); !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), "data") {
		t.Fatalf("empty data: error %v", err)
	}
}

func TestParseLoss(t *testing.T) {
	ls, err := parseLoss("", nil)
	if err != nil || ls.name != LossCrossEntropy {
		t.Fatalf("default loss = %+v, %v; want cross_entropy", ls, err)
	}
	ls, err = parseLoss(LossPPO, map[string]float64{"clip_low_threshold": 0.7})
	if err != nil || ls.clipLow != 0.7 || ls.clipHigh != DefaultClipHigh {
		t.Fatalf("ppo config = %+v, %v", ls, err)
	}
	for _, tc := range []struct {
		name string
		cfg  map[string]float64
		want string
	}{
		{"mse", nil, "loss_fn"},
		{LossCrossEntropy, map[string]float64{"clip_low_threshold": 0.5}, "clip_low_threshold"},
		{LossPPO, map[string]float64{"clip_hi": 1}, "clip_hi"},
		{LossPPO, map[string]float64{"clip_low_threshold": 1.5}, "clip_low_threshold"},
		{LossPPO, map[string]float64{"clip_high_threshold": math.NaN()}, "clip_high_threshold"},
	} {
		if _, err := parseLoss(tc.name, tc.cfg); !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseLoss(%q, %v) error %v, want one naming %s", tc.name, tc.cfg, err, tc.want)
		}
	}
}
