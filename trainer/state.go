package trainer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// The files of a saved session. An "adapter" checkpoint is the PEFT pair; a
// "full" one adds the optimizer's moments (and any gradients accumulated
// but not yet applied) and the step, so training resumes bit-for-bit.
const (
	AdapterConfigFile  = "adapter_config.json"
	AdapterWeightsFile = "adapter_model.safetensors"
	OptimizerFile      = "optimizer.safetensors"
	TrainerStateFile   = "trainer_state.json"
)

// Save modes.
const (
	SaveAdapter = "adapter"
	SaveFull    = "full"
)

const trainerStateFormat = "signal-trainer-state/1"

// trainerState is trainer_state.json.
type trainerState struct {
	Format   string      `json:"format"`
	Step     int         `json:"step"`
	HasGrad  bool        `json:"has_grad"`
	Schedule *LRSchedule `json:"lr_schedule,omitempty"`
}

// SaveState writes the session into dir (created if needed) and returns the
// names of the files written, relative to dir. mode is "adapter" (PEFT files
// that Hugging Face PEFT loads unchanged) or "full" (also optimizer state).
func (s *Session) SaveState(dir, mode string) ([]string, error) {
	if mode == "" {
		mode = SaveAdapter
	}
	if mode != SaveAdapter && mode != SaveFull {
		return nil, fmt.Errorf("%w: mode %q: want %s or %s", ErrInvalidInput, mode, SaveAdapter, SaveFull)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrSessionClosed
	}
	if err := s.lora.Save(dir); err != nil {
		return nil, fmt.Errorf("save state: %w", err)
	}
	files := []string{AdapterConfigFile, AdapterWeightsFile}
	if mode == SaveAdapter {
		return files, nil
	}
	var ts []safetensors.Tensor
	add := func(set *LoRA, suffix string) {
		for li := range set.Layers {
			for mod, p := range set.Layers[li] {
				if p == nil {
					continue
				}
				pre := peftPrefix(li, Module(mod))
				ts = append(ts,
					safetensors.Tensor{Name: pre + ".lora_A." + suffix, Shape: []int{set.Rank, p.In}, Data: p.A},
					safetensors.Tensor{Name: pre + ".lora_B." + suffix, Shape: []int{p.Out, set.Rank}, Data: p.B})
			}
		}
	}
	add(s.m1, "exp_avg")
	add(s.m2, "exp_avg_sq")
	if s.hasGrad {
		add(s.grads, "grad")
	}
	if err := safetensors.WriteFile(filepath.Join(dir, OptimizerFile), ts, map[string]string{"format": trainerStateFormat}); err != nil {
		return nil, fmt.Errorf("save state: %w", err)
	}
	st := trainerState{Format: trainerStateFormat, Step: s.step, HasGrad: s.hasGrad, Schedule: s.cfg.Schedule}
	raw, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("save state: %w", err)
	}
	tmp := filepath.Join(dir, "."+TrainerStateFile+".tmp")
	if err := os.WriteFile(tmp, append(raw, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("save state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, TrainerStateFile)); err != nil {
		return nil, fmt.Errorf("save state: %w", err)
	}
	return append(files, OptimizerFile, TrainerStateFile), nil
}

// LoadState replaces the session's adapter with the one saved in dir, and,
// when dir is a full checkpoint, its optimizer moments, pending gradients and
// step. From an adapter-only checkpoint the optimizer starts fresh at step 0.
// The adapter's rank and targets come from the checkpoint. Nothing changes
// unless everything loads.
func (s *Session) LoadState(dir string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrSessionClosed
	}
	lora, err := LoadAdapter(dir, s.m)
	if err != nil {
		return fmt.Errorf("load state: %w", err)
	}
	m1, m2, grads := zerosLike(lora), zerosLike(lora), zerosLike(lora)
	var st trainerState
	raw, err := os.ReadFile(filepath.Join(dir, TrainerStateFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
		// adapter-only checkpoint
	case err != nil:
		return fmt.Errorf("load state: %w", err)
	default:
		if err := json.Unmarshal(raw, &st); err != nil {
			return fmt.Errorf("load state %s: %w: %v", TrainerStateFile, ErrInvalidInput, err)
		}
		if st.Format != trainerStateFormat {
			return fmt.Errorf("load state %s: %w: format %q (want %q)", TrainerStateFile, ErrUnsupported, st.Format, trainerStateFormat)
		}
		if st.Step < 0 {
			return fmt.Errorf("load state %s: %w: step %d", TrainerStateFile, ErrInvalidInput, st.Step)
		}
		if st.Schedule != nil {
			if err := st.Schedule.Validate(); err != nil {
				return fmt.Errorf("load state %s: %w", TrainerStateFile, err)
			}
		}
		if err := readOptimizer(filepath.Join(dir, OptimizerFile), m1, m2, grads, st.HasGrad); err != nil {
			return err
		}
	}
	s.lora = lora
	s.m1, s.m2, s.grads = m1, m2, grads
	s.hasGrad = st.HasGrad
	s.step = st.Step
	if s.cfg.Schedule == nil && st.Schedule != nil {
		s.cfg.Schedule = st.Schedule
	}
	s.cfg.Rank, s.cfg.Alpha, s.cfg.TargetModules = lora.Rank, lora.Alpha, lora.TargetModules
	return nil
}

// readOptimizer fills the moment sets (and the pending gradients when
// hasGrad) from optimizer.safetensors, checking every name and shape.
func readOptimizer(path string, m1, m2, grads *LoRA, hasGrad bool) error {
	f, err := safetensors.Open(path)
	if err != nil {
		return fmt.Errorf("load state: %w", err)
	}
	defer f.Close()
	want := 0
	read := func(set *LoRA, suffix string) error {
		for li := range set.Layers {
			for mod, p := range set.Layers[li] {
				if p == nil {
					continue
				}
				pre := peftPrefix(li, Module(mod))
				for _, t := range []struct {
					name  string
					dst   []float32
					shape []int
				}{
					{pre + ".lora_A." + suffix, p.A, []int{set.Rank, p.In}},
					{pre + ".lora_B." + suffix, p.B, []int{p.Out, set.Rank}},
				} {
					info, ok := f.Tensors[t.name]
					if !ok {
						return fmt.Errorf("load state %s: %w: tensor %q is missing", path, ErrInvalidInput, t.name)
					}
					if !slices.Equal(info.Shape, t.shape) {
						return fmt.Errorf("load state %s: %w: tensor %q has shape %v, want %v", path, ErrInvalidInput, t.name, info.Shape, t.shape)
					}
					if err := f.ReadFloat32(t.name, t.dst); err != nil {
						return fmt.Errorf("load state %s: %w", path, err)
					}
					want++
				}
			}
		}
		return nil
	}
	if err := read(m1, "exp_avg"); err != nil {
		return err
	}
	if err := read(m2, "exp_avg_sq"); err != nil {
		return err
	}
	if hasGrad {
		if err := read(grads, "grad"); err != nil {
			return err
		}
	}
	if n := len(f.Tensors); n != want {
		return fmt.Errorf("load state %s: %w: %d tensors, want %d", path, ErrInvalidInput, n, want)
	}
	return nil
}

// Sample draws completions from the base model with the session's current
// adapter (see Model.Sample).
func (s *Session) Sample(ctx context.Context, prompts [][]int, numSamples int, p SamplingParams) ([][]Sample, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrSessionClosed
	}
	return s.m.Sample(ctx, prompts, numSamples, p, s.lora)
}
