package trainer

import (
	"context"
	"path/filepath"
	"testing"
)

// TestAdapterRoundTripWithPEFT is the PEFT round trip, both directions:
// an adapter Signal trained and saved (save_state's adapter files) loads
// with PeftModel.from_pretrained unchanged and gives Signal's logits; an
// adapter PEFT made (random A and B, a subset of modules, its own
// save_pretrained files) loads with LoadState and gives PEFT's logits. The
// tolerance is TestMatchesPyTorch's: float32 on both sides, on the same
// BF16-exact base weights.
func TestAdapterRoundTripWithPEFT(t *testing.T) {
	var hf *reference
	for _, r := range references(t) {
		if r.name == refHF {
			hf = &r
		}
	}
	if hf == nil {
		t.Skip("no transformers + PEFT environment (make test builds it)")
	}
	for _, name := range tinyModels {
		t.Run(name, func(t *testing.T) {
			m := mustLoad(t, name)
			V := m.Config().VocabSize
			tokens := testTokens(13, V, 4)
			tmp := t.TempDir()

			// Signal -> PEFT: three training steps, then save_state's files.
			s := mustSession(t, m, SessionConfig{Rank: 4, Alpha: 8, Seed: 3})
			data := []Datum{{Tokens: tokens[:12], TargetTokens: tokens[1:], Weights: ones(12)}}
			p := DefaultAdamParams()
			p.LearningRate = 2e-2
			for i := 0; i < 3; i++ {
				mustFB(t, s, data)
				mustStep(t, s, p)
			}
			signalDir := filepath.Join(tmp, "signal-adapter")
			if _, err := s.SaveState(signalDir, SaveAdapter); err != nil {
				t.Fatal(err)
			}
			// PEFT -> Signal: PEFT's own adapter on three modules.
			peftDir := filepath.Join(tmp, "peft-adapter")
			var ans struct{ Answers []map[string]any }
			runRef(t, *hf, nil, map[string]any{"cmd": "batch", "requests": []map[string]any{
				{"cmd": "peft_init", "model": modelDir(name), "out": peftDir,
					"r": 3, "lora_alpha": 12, "target_modules": []string{"q_proj", "v_proj", "down_proj"}, "seed": 9},
				{"cmd": "logits", "model": modelDir(name), "adapter": signalDir, "tokens": tokens, "out": filepath.Join(tmp, "signal.f32")},
				{"cmd": "logits", "model": modelDir(name), "adapter": peftDir, "tokens": tokens, "out": filepath.Join(tmp, "peft.f32")},
			}}, &ans)

			got, err := m.Logits(context.Background(), tokens, s.LoRA())
			if err != nil {
				t.Fatal(err)
			}
			base, err := m.Logits(context.Background(), tokens, nil)
			if err != nil {
				t.Fatal(err)
			}
			// A trained adapter moves the logits, so PEFT dropping a tensor it
			// cannot name (it warns and keeps B = 0) fails the comparison.
			if maxAbsDiff(base, got) < 1e-3 {
				t.Fatal("three steps left the adapter without effect; the round trip proves nothing")
			}
			t.Run("signal adapter in PEFT", func(t *testing.T) { compareLogits(t, got, readF32(t, filepath.Join(tmp, "signal.f32"))) })

			loaded := mustSession(t, m, SessionConfig{Rank: 8, Alpha: 16, Seed: 1})
			if err := loaded.LoadState(peftDir); err != nil {
				t.Fatalf("LoadState of a PEFT adapter: %v", err)
			}
			if l := loaded.LoRA(); l.Rank != 3 || l.Alpha != 12 {
				t.Fatalf("loaded adapter rank %d alpha %v, want PEFT's 3 and 12", l.Rank, l.Alpha)
			}
			got, err = m.Logits(context.Background(), tokens, loaded.LoRA())
			if err != nil {
				t.Fatal(err)
			}
			t.Run("PEFT adapter in signal", func(t *testing.T) { compareLogits(t, got, readF32(t, filepath.Join(tmp, "peft.f32"))) })
			if maxAbsDiff(base, got) < 1e-3 {
				t.Fatal("PEFT's random adapter did not change the logits; the round trip proves nothing")
			}
		})
	}
}

func maxAbsDiff(a, b []float32) float64 {
	var d float64
	for i := range a {
		if x := float64(a[i] - b[i]); x > d {
			d = x
		} else if -x > d {
			d = -x
		}
	}
	return d
}
