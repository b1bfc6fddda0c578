package trainer

import (
	"fmt"
	"math"
)

// LRSchedule is a learning-rate schedule fixed when a session is created; an
// OptimStep whose AdamParams name no learning rate takes its rate from it.
//
// Kind is "constant", "linear" or "cosine". Every kind warms up linearly from
// 0 to PeakLR over WarmupSteps (0 = no warmup); "linear" and "cosine" then
// decay to FinalFraction × PeakLR at TotalSteps and stay there.
type LRSchedule struct {
	Kind          string
	PeakLR        float64
	WarmupSteps   int
	TotalSteps    int
	FinalFraction float64
}

// Validate reports the first field that is out of range.
func (s *LRSchedule) Validate() error {
	switch s.Kind {
	case "constant", "linear", "cosine":
	default:
		return fmt.Errorf("%w: lr_schedule.kind %q: want constant, linear or cosine", ErrInvalidInput, s.Kind)
	}
	if !(s.PeakLR > 0) || math.IsInf(s.PeakLR, 0) {
		return fmt.Errorf("%w: lr_schedule.peak_lr %v: want a finite value > 0", ErrInvalidInput, s.PeakLR)
	}
	if s.WarmupSteps < 0 {
		return fmt.Errorf("%w: lr_schedule.warmup_steps %d: want >= 0", ErrInvalidInput, s.WarmupSteps)
	}
	if s.Kind != "constant" {
		if s.TotalSteps <= s.WarmupSteps {
			return fmt.Errorf("%w: lr_schedule.total_steps %d: want > warmup_steps (%d)", ErrInvalidInput, s.TotalSteps, s.WarmupSteps)
		}
		if s.FinalFraction < 0 || s.FinalFraction > 1 || math.IsNaN(s.FinalFraction) {
			return fmt.Errorf("%w: lr_schedule.final_fraction %v: want within [0, 1]", ErrInvalidInput, s.FinalFraction)
		}
	}
	return nil
}

// At returns the learning rate of optimizer step `step`, counted from 1 (the
// first update uses At(1), so warmup never applies a zero rate).
func (s *LRSchedule) At(step int) float64 {
	if step < 1 {
		step = 1
	}
	if s.WarmupSteps > 0 && step <= s.WarmupSteps {
		return s.PeakLR * float64(step) / float64(s.WarmupSteps)
	}
	if s.Kind == "constant" {
		return s.PeakLR
	}
	progress := float64(step-s.WarmupSteps) / float64(s.TotalSteps-s.WarmupSteps)
	progress = math.Min(math.Max(progress, 0), 1)
	f := s.FinalFraction
	switch s.Kind {
	case "linear":
		return s.PeakLR * (1 - (1-f)*progress)
	default: // cosine
		return s.PeakLR * (f + (1-f)*0.5*(1+math.Cos(math.Pi*progress)))
	}
}
