package trainer

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
)

// Errors of the training calls, besides ErrInvalidInput for bad arguments.
var (
	// ErrNoGradients is returned by an OptimStep with no ForwardBackward
	// since the last step. It wraps ErrInvalidInput: the caller's mistake.
	ErrNoGradients = fmt.Errorf("%w: no gradients accumulated: call forward_backward before optim_step", ErrInvalidInput)
	// ErrSessionClosed is returned by every call on a closed session.
	ErrSessionClosed = errors.New("session closed")
)

// DefaultLoRARank is the public API's default rank (callers fill it in; a
// SessionConfig's rank must be > 0). DefaultLoRAAlpha is taken when a
// SessionConfig's Alpha is 0.
const (
	DefaultLoRARank  = 32
	DefaultLoRAAlpha = 32
)

// SessionConfig configures a training session: its LoRA adapter and an
// optional learning-rate schedule. Rank must be > 0; zero values of the
// others take the defaults: alpha DefaultLoRAAlpha, every linear layer of
// the blocks.
type SessionConfig struct {
	Rank          int
	Alpha         float32
	TargetModules []string
	Seed          int64
	Schedule      *LRSchedule
}

// ForwardResult is what Forward and ForwardBackward return. WeightSum is
// the sum of the loss weights (1 per position of a datum without weights),
// the denominator callers need to combine several calls' means; LossMean is
// LossSum over WeightSum (over the token count when no weight is set); GradNorm (ForwardBackward only) is the L2 norm of this call's
// gradient of LossSum over all LoRA parameters. Logprobs[i][j] is the model's
// log-probability of data[i].TargetTokens[j].
type ForwardResult struct {
	LossSum, LossMean float64
	WeightSum         float64
	Tokens            int
	GradNorm          float64
	Logprobs          [][]float32
	// TopIDs and TopLogprobs are, per datum, each position's K most likely
	// next tokens and their log-probabilities (row-major, K per position,
	// most likely first), when ForwardTopK asked for them.
	TopIDs      [][]int32
	TopLogprobs [][]float32
}

// OptimResult is what OptimStep returns: the step number after the update,
// the learning rate it used and the gradient norm before clipping.
type OptimResult struct {
	Step         int
	LearningRate float64
	GradNorm     float64
}

// Session is one run's trainable state over a shared base model: a LoRA
// adapter, its accumulated gradients and AdamW moments, and the step count.
// The base model is only read, so any number of sessions share one Model.
// Calls on one session are serialised; a rejected call (bad input, a
// cancelled context) leaves the session as it was.
type Session struct {
	m   *Model
	cfg SessionConfig

	mu      sync.Mutex
	closed  bool
	lora    *LoRA
	grads   *LoRA // accumulated since the last OptimStep
	m1, m2  *LoRA // AdamW first and second moments
	step    int
	hasGrad bool
}

// NewSession opens a training session on m with a fresh PEFT-initialised
// adapter (A Kaiming-uniform, B zero: outputs start equal to the base's).
func NewSession(m *Model, cfg SessionConfig) (*Session, error) {
	if cfg.Alpha == 0 {
		cfg.Alpha = DefaultLoRAAlpha
	}
	if cfg.Rank <= 0 {
		return nil, fmt.Errorf("%w: rank %d: want > 0", ErrInvalidInput, cfg.Rank)
	}
	if cfg.Schedule != nil {
		if err := cfg.Schedule.Validate(); err != nil {
			return nil, err
		}
		sc := *cfg.Schedule
		cfg.Schedule = &sc
	}
	lora, err := NewLoRA(m, cfg.Rank, cfg.Alpha, cfg.TargetModules, cfg.Seed)
	if err != nil {
		return nil, err
	}
	s := &Session{m: m, cfg: cfg}
	s.setLoRA(lora)
	m.arenas.hold()
	return s, nil
}

// setLoRA installs an adapter with zero gradients and moments.
func (s *Session) setLoRA(l *LoRA) {
	s.lora = l
	s.grads = zerosLike(l)
	s.m1, s.m2 = zerosLike(l), zerosLike(l)
	s.hasGrad = false
}

// zerosLike returns an adapter of l's shape filled with zeros: the shape of
// its gradients and optimizer moments.
func zerosLike(l *LoRA) *LoRA {
	z := l.Clone()
	for _, p := range z.Pairs() {
		clear(p.A)
		clear(p.B)
	}
	return z
}

// arenaLike returns zeroed gradient buffers of l's shape from the arena.
func arenaLike(l *LoRA, ar *arena) *LoRA {
	z := &LoRA{Rank: l.Rank, Alpha: l.Alpha, TargetModules: l.TargetModules, Layers: make([][NumModules]*LoRAPair, len(l.Layers))}
	for i := range l.Layers {
		for mod, p := range l.Layers[i] {
			if p != nil {
				z.Layers[i][mod] = &LoRAPair{A: ar.zeroed(len(p.A)), B: ar.zeroed(len(p.B)), In: p.In, Out: p.Out}
			}
		}
	}
	return z
}

// tensors lists an adapter-shaped set's tensors in a fixed order (per pair,
// A then B), the order the optimizer walks parameters, gradients and moments.
func tensors(l *LoRA) [][]float32 {
	var out [][]float32
	for _, p := range l.Pairs() {
		out = append(out, p.A, p.B)
	}
	return out
}

// Model returns the base model.
func (s *Session) Model() *Model { return s.m }

// LoRA returns the session's adapter. It is the live one: read it only
// between calls.
func (s *Session) LoRA() *LoRA {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lora
}

// Step returns the number of optimizer steps taken.
func (s *Session) Step() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.step
}

// Close releases the session's state (and, with the model's last session,
// the model's activation arenas). Later calls return ErrSessionClosed.
func (s *Session) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.lora, s.grads, s.m1, s.m2 = nil, nil, nil, nil
	s.m.arenas.drop()
	return nil
}

// ForwardBackward computes the loss of data under lossFn and adds the
// gradient of its sum w.r.t. the adapter to the session's accumulated
// gradients; gradients of several calls add up until OptimStep.
func (s *Session) ForwardBackward(ctx context.Context, data []Datum, lossFn string, lossCfg map[string]float64) (*ForwardResult, error) {
	return s.run(ctx, data, lossFn, lossCfg, true, 0)
}

// Forward computes the loss and logprobs of data without gradients.
func (s *Session) Forward(ctx context.Context, data []Datum, lossFn string, lossCfg map[string]float64) (*ForwardResult, error) {
	return s.run(ctx, data, lossFn, lossCfg, false, 0)
}

// MaxTopK bounds ForwardTopK's k.
const MaxTopK = 20

// ForwardTopK is Forward that also answers each position's k most likely
// next tokens (1 ≤ k ≤ MaxTopK): the top-k prompt logprobs of a sampler.
func (s *Session) ForwardTopK(ctx context.Context, data []Datum, lossFn string, lossCfg map[string]float64, k int) (*ForwardResult, error) {
	if k < 1 || k > MaxTopK {
		return nil, fmt.Errorf("%w: top-k %d: want 1..%d", ErrInvalidInput, k, MaxTopK)
	}
	return s.run(ctx, data, lossFn, lossCfg, false, k)
}

func (s *Session) run(ctx context.Context, data []Datum, lossFn string, lossCfg map[string]float64, grad bool, topK int) (*ForwardResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrSessionClosed
	}
	var g *LoRA
	if grad {
		g = s.grads
	}
	res, err := runPass(ctx, s.m, s.lora, data, lossFn, lossCfg, g, topK)
	if err != nil {
		return nil, err
	}
	if grad {
		s.hasGrad = true
	}
	return res, nil
}

// runPass validates data, runs the model with lora and, when grads is not
// nil, adds the gradient of the loss sum to grads (shaped like lora). The
// call's gradient is built in arena buffers and added only once the whole
// pass has succeeded, so a cancelled call leaves grads as they were.
func runPass(ctx context.Context, m *Model, lora *LoRA, data []Datum, lossFn string, lossCfg map[string]float64, grads *LoRA, topK int) (*ForwardResult, error) {
	ls, err := parseLoss(lossFn, lossCfg)
	if err != nil {
		return nil, err
	}
	c := m.cfg
	if err := validateData(data, ls, c.VocabSize, c.MaxPositionEmbeddings); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ar := m.arenas.get()
	defer m.arenas.put(ar)
	defer singleThreadBLAS()()
	p := newTrainPass(m, lora, data, ar)
	if err := p.forward(ctx); err != nil {
		return nil, err
	}
	if topK > 0 {
		p.topK, p.topIDs, p.topLPs = topK, make([]int32, p.rows*topK), make([]float32, p.rows*topK)
	}
	rowDatum := make([]int32, p.rows)
	for i := range data {
		for r := p.seqOff[i]; r < p.seqOff[i+1]; r++ {
			rowDatum[r] = int32(i)
		}
	}
	var lossSum, weightSum float64
	lossAt := func(row int, logp float64) float64 {
		di := int(rowDatum[row])
		l, g := ls.token(&data[di], row-p.seqOff[di], logp)
		lossSum += l
		weightSum += lossWeight(&data[di], row-p.seqOff[di])
		return g
	}
	var dxf []float32
	if grads != nil {
		dxf = ar.dirty(p.rows * c.HiddenSize)
	}
	p.head(dxf, lossAt)
	res := &ForwardResult{LossSum: lossSum, WeightSum: weightSum, Tokens: p.rows, Logprobs: make([][]float32, len(data))}
	if weightSum > 0 {
		res.LossMean = lossSum / weightSum
	} else {
		res.LossMean = lossSum / float64(p.rows)
	}
	for i := range data {
		res.Logprobs[i] = append([]float32(nil), p.logp[p.seqOff[i]:p.seqOff[i+1]]...)
		if topK > 0 {
			lo, hi := p.seqOff[i]*topK, p.seqOff[i+1]*topK
			res.TopIDs = append(res.TopIDs, p.topIDs[lo:hi])
			res.TopLogprobs = append(res.TopLogprobs, p.topLPs[lo:hi])
		}
	}
	if grads != nil {
		if lora == nil {
			return nil, fmt.Errorf("%w: forward_backward needs an adapter", ErrInvalidInput)
		}
		call := arenaLike(lora, ar)
		if err := p.backward(ctx, dxf, call); err != nil {
			return nil, err
		}
		ct := tensors(call)
		res.GradNorm = globalNorm(ct)
		for i, acc := range tensors(grads) {
			for j, v := range ct[i] {
				acc[j] += v
			}
		}
	}
	return res, nil
}

// OptimStep applies AdamW to the adapter with the gradients accumulated since
// the last step, then zeroes them. A zero LearningRate takes the rate from
// the session's schedule (or DefaultLearningRate without one).
func (s *Session) OptimStep(ctx context.Context, p AdamParams) (*OptimResult, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrSessionClosed
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if !s.hasGrad {
		return nil, ErrNoGradients
	}
	step := s.step + 1
	lr := p.LearningRate
	if lr == 0 {
		lr = DefaultLearningRate
		if s.cfg.Schedule != nil {
			lr = s.cfg.Schedule.At(step)
		}
	}
	gs := tensors(s.grads)
	norm := globalNorm(gs)
	if math.IsNaN(norm) || math.IsInf(norm, 0) {
		// Applying it would destroy the adapter; drop the gradients instead.
		for _, g := range gs {
			clear(g)
		}
		s.hasGrad = false
		return nil, fmt.Errorf("%w: gradient norm is %v; gradients dropped, adapter unchanged", ErrInvalidInput, norm)
	}
	coef := clipCoef(norm, p.GradClipNorm)
	ps, m1, m2 := tensors(s.lora), tensors(s.m1), tensors(s.m2)
	for i := range ps {
		adamwUpdate(ps[i], gs[i], m1[i], m2[i], coef, lr, p.Beta1, p.Beta2, p.Eps, p.WeightDecay, step)
		clear(gs[i])
	}
	s.step = step
	s.hasGrad = false
	return &OptimResult{Step: step, LearningRate: lr, GradNorm: norm}, nil
}
